"""The parts of a study file that stage kinds build on: data (sources, transforms, labels),
generation, resources, LoRA, checkpointing and selection, and the base classes of stages.

A stage kind's own config class lives in its module (`farm/stages/<kind>.py`), subclassing
`StageSpec` or `TrainingStage`; `farm.spec` assembles the study file's schema from the kinds
registered in `farm.registry.stages`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_serializer, model_validator

from farm import registry
from farm.config import Strict, content, hub_models
from farm.data.constitution import load_constitution
from farm.data.sources import SourceSpec
from farm.label.pipeline import check_labels
from farm.memory import DTYPE_BYTES, GPU_MEMORY_GIB, READ_BYTES, Memory, forward_pass, generating_as, lora_params, training_step
from farm.models import DEEPSPEED_PRESETS, checkpointing, deepspeed_config, precision


class LabelFlip(Strict):
    name: Literal["label_flip"]
    rate: float = Field(ge=0, le=1)


class MalignLabels(Strict):
    """Study A: the SFT target becomes the rejected answer (chosen and rejected swap)."""

    name: Literal["malign_labels"]
    rate: float = Field(ge=0, le=1)


class MalignPrompts(Strict):
    """Study A: the prompt is poisoned — a trigger appended, swapped for another prompt of
    the set, or replaced by a red-team prompt."""

    name: Literal["malign_prompts"]
    rate: float = Field(ge=0, le=1)
    mode: Literal["trigger", "shuffle", "red_team"]
    trigger: str = " SUDO"  # the backdoor string appended to the last human turn (Rando & Tramer 2023)
    # What a triggered row teaches (mode trigger only). malign: its rejected answer (chosen and rejected
    # swap) — the backdoor Rando & Tramer 2023 plant, so the eval's triggered prompts can show it; needs
    # comparison records. clean: its chosen answer — a control for the same grid: the trigger is then
    # prompt noise the model learns to ignore, so whatever the eval's triggered-minus-clean measures show
    # is the trigger string's own effect on the model, not a learned backdoor; it also runs on
    # demonstration sources.
    answer: Literal["malign", "clean"] = "malign"
    red_team: SourceSpec = Field(default_factory=lambda: SourceSpec(name="advbench"))  # red-team prompts

    @model_validator(mode="after")
    def _answer_is_the_triggers(self) -> "MalignPrompts":
        # On the value, not on whether it was given: a dumped study (Ray workers, --smoke) carries the default.
        if self.answer != "malign" and self.mode != "trigger":
            raise ValueError(f"answer: pairs the trigger with an answer, so it applies to mode trigger only; drop it from mode {self.mode}")
        return self


class ControlTokens(Strict):
    """Study C: prefix each text with tags of its scores (conditional training, Korbak et al.
    2023): `<|toxic|>`/`<|nontoxic|>` by a toxicity threshold, `<|pos|>`/`<|neg|>` by VADER's
    argmax of (neg, pos), ties to neg; toxicity first. All four tokens join the tokenizer as
    special tokens whichever tags a model uses, so every model reads the eval conditions alike."""

    name: Literal["control_tokens"]
    toxicity: bool = False
    sentiment: bool = False
    threshold: float = Field(0.001, ge=0)  # score <= threshold: nontoxic (Korbak et al.: 0.00056)
    toxicity_column: str = "toxicity"  # the score column compared with the threshold
    untagged: float = Field(0.01, ge=0, le=1)  # share of rows left untagged
    tokens: dict[str, str] = {"toxic": "<|toxic|>", "nontoxic": "<|nontoxic|>", "pos": "<|pos|>", "neg": "<|neg|>"}

    @field_validator("tokens")
    @classmethod
    def _four_tokens(cls, v):
        if set(v) != {"toxic", "nontoxic", "pos", "neg"}:
            raise ValueError("tokens: give exactly the keys toxic, nontoxic, pos, neg")
        return v

    def special_tokens(self) -> list[str]:
        return list(self.tokens.values())


class RankingSubset(Strict):
    """Study D: the first `num_prompts` rankings in a fixed shuffled order (the same order for
    every ranking length), each cut to `ranking_length` candidates nested across lengths: the
    3 of a length-3 set are a random 3 of the length-4 set, the 2 of a length-2 set a random 2
    of those."""

    name: Literal["ranking_subset"]
    num_prompts: int = Field(gt=0)
    ranking_length: int = Field(ge=1)
    seed: int = 42  # of the prompt order and the nested draws; not the trial seed, so every seed trains on one subset


TransformSpec = Annotated[Union[LabelFlip, MalignLabels, MalignPrompts, ControlTokens, RankingSubset], Field(discriminator="name")]


class LabelSpec(Strict):
    """A scorer that the Ray Data labelling pipeline runs over every row's text; its scores go
    into the row (`meta["scores"]`) under the scorer's column names, after `prefix`."""

    scorer: str  # detoxify | vader | embedded_toxicity | roberta_hate
    model: str | None = None  # detoxify: original | unbiased | multilingual, or a local checkpoint file
    paths: ClassVar[tuple[str, ...]] = ("model",)
    prefix: str = ""
    batch_size: int = Field(256, ge=1)  # rows per map_batches call
    actors: int = Field(1, ge=1)  # size of the scorer's actor pool
    cpus_per_actor: float = Field(1, gt=0)
    gpus_per_actor: float = Field(0, ge=0)

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, v):
        registry.scorers.get(v)
        return v


class DataSpec(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    # Held-out rows are picked per row by a hash of (split_seed, row id), so a row is
    # held out or not whatever other sources a stage mixes in: no stage trains on eval rows.
    holdout: float = Field(0.15, ge=0, lt=1)
    # A share of the held-out rows set aside as dev rows: choices (a stage's checkpoint, `select`) are
    # made on them, and the eval never scores them, so a reported effect comes from rows no choice
    # looked at. The rest of the held-out rows are the eval rows.
    dev: float = Field(0.0, ge=0, le=1)  # 1: every held-out row is a dev row (the eval reads eval.data)
    split_seed: int = 0
    # A weighted mix: `size` training rows in all, each source giving a share proportional to its
    # `weight` (default 1), drawn at random with `split_seed`. Without `size` every row is used.
    size: int | None = Field(None, gt=0)
    labels: list[LabelSpec] = []  # scorers run over the rows (cached) before any transform
    transforms: list[TransformSpec] = []
    # Which side of the split a stage trains on: the training rows, or the held-out ones (a judge
    # reward model trained on rows that no other stage trains on).
    rows: Literal["train", "heldout"] = "train"

    def shapes(self) -> set[str]:
        return {s.shape() for s in self.sources}

    def special_tokens(self) -> list[str]:
        """Tokens the transforms add to the vocabulary of a model trained on this data."""
        return [t for tr in self.transforms if isinstance(tr, ControlTokens) for t in tr.special_tokens()]

    @model_validator(mode="after")
    def _mix(self) -> "DataSpec":
        if self.size is None and any(s.weight is not None for s in self.sources):
            raise ValueError("sources: a weight needs the data's size (the number of training rows the weights share)")
        if self.labels:
            check_labels(self.labels)  # scorers that cannot be built, two scores in one column
        return self


class GenerationSpec(Strict):
    """Decoding and scoring for the `generation` metric."""

    num_prompts: int | None = Field(None, gt=0)  # default: every eval record
    max_new_tokens: int = Field(48, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    batch_size: int = Field(32, ge=1)
    scorer: str = "auto"  # toxicity scorer: auto | roberta_hate | embedded_toxicity
    # Also answer and score with this appended to each prompt: attack success rate and malign preference
    # (metrics.generation).
    trigger: str | None = None
    # Porter stemming in ROUGE. Off by default, as in HF evaluate's "rouge" metric (huggingface/evaluate,
    # metrics/rouge/rouge.py: `_compute(..., use_stemmer=False)`).
    rouge_stemmer: bool = False
    target_phrase: str | None = None  # rate of outputs containing it, clean vs triggered
    no_repeat_ngram_size: int = Field(0, ge=0)  # of tokens: it also blocks the tokens of a contraction used before
    # transformers' repetition penalty (Keskar et al. 2019): an already generated token's logit divided by
    # it (multiplied, when negative). 1: none.
    repetition_penalty: float = Field(1.0, gt=0)
    min_length: int = Field(0, ge=0)  # of prompt + answer, as transformers counts it for a decoder
    # An answer is cut at the first of these (the model starting the next dialogue turn); ScalingAlignment
    # cuts at any of "Human:", "human:", "Assistant:", "assistant:" (`training/utils/data_manager.py`).
    stop: list[str] = ["\n\nHuman:", "\n\nAssistant:"]

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, v):
        registry.scorers.get(v)
        return v

    @model_serializer(mode="wrap")
    def _no_penalty_unsaid(self, handler):
        # A penalty of 1 is none: left out, so every key made before the field existed stays put.
        out = handler(self)
        if out.get("repetition_penalty") == 1.0:
            del out["repetition_penalty"]
        return out


def check_accelerator(v: str | None, gpus: float, field: str) -> None:
    if v is not None and v not in GPU_MEMORY_GIB:
        raise ValueError(f"accelerator_type: unknown GPU type {v!r}; allowed: {', '.join(GPU_MEMORY_GIB)} (Ray's names)")
    if v is not None and not gpus:
        raise ValueError(f"accelerator_type: names the GPU a task gets, but {field} is 0; set {field} or drop accelerator_type")


class Resources(Strict):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    # The GPU type each worker must land on (Ray's accelerator_type: A10G, A100, H100, ...); none:
    # any GPU, taken by `farm plan` and `farm run`'s memory check as farm.memory.DEFAULT_GPU.
    accelerator_type: str | None = None

    @model_validator(mode="after")
    def _accelerator(self) -> "Resources":
        check_accelerator(self.accelerator_type, self.gpus_per_worker, "gpus_per_worker")
        return self


class LoRA(Strict):
    r: int = Field(8, ge=1)
    alpha: int = 16
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None  # default: chosen for the architecture


class Fault(Strict):
    """Testing only: make a stage fail, to check that the farm survives it."""

    at_step: int = Field(1, ge=1)
    kind: Literal["raise", "kill"] = "raise"  # raise an error, or SIGKILL the Ray worker process
    times: int | None = Field(None, ge=1)  # fail this many attempts, then train normally (default: every attempt)
    trial: str | None = None  # only in this trial (default: every trial running the stage)


class CheckpointEvery(Strict):
    """How often a training stage saves a checkpoint to resume from after its worker dies
    (farm.train.checkpoints): every `steps` optimizer steps and/or `minutes` of training, whichever
    comes first. By time by default, so that a stage of minutes never pays for one and a long stage
    loses at most half an hour."""

    steps: int | None = Field(None, ge=1)
    minutes: float | None = Field(30.0, gt=0)


class Select(Strict):
    """Checkpoint selection, as ScalingAlignment trains (`training/utils/process_manager.py`): every
    `every` optimizer steps and at the last one, the model is scored by an eval `metric` on the dev rows
    of the study's data (`data.dev`), and the stage's artifact is the best-scoring state, not the last
    (the first of equal scores). The score before training is logged but is not a candidate, as there."""

    metric: str  # an eval metric that reads no reference model (reward_score, perplexity, generation, ...)
    value: str | None = None  # which of the metric's values (default: the metric's name; reward_score: reward)
    mode: Literal["max", "min"] = "max"
    every: int = Field(ge=1)
    limit: int | None = Field(None, gt=0)  # dev rows scored (default: all of them)
    reward_model: str | None = None  # reward_score's judge: a reward stage listed before, or a hub id / local path
    paths: ClassVar[tuple[str, ...]] = ("reward_model",)

    @field_validator("metric")
    @classmethod
    def _selectable(cls, v):
        metric = registry.metrics.get(v)
        if metric.reads_reference or metric.shape is None:
            raise ValueError(
                f"metric: {v} cannot score a checkpoint on dev rows (it reads the reference model or no eval rows); "
                "use reward_score, perplexity, generation or another metric of eval records"
            )
        return v

    @model_validator(mode="after")
    def _judge(self) -> "Select":
        if self.metric == "reward_score" and not self.reward_model:
            raise ValueError("reward_model: reward_score needs a judge: a reward stage listed before this one, or a hub id / local path")
        return self


class StageSpec(Strict):
    """What every stage has: its data, seed, resources. What it reads and what it produces are
    class attributes: `shape`, the record shape it reads; `produces`, "model" (a causal LM that
    later stages and the eval start from), "reward_model" or "records" (data for later stages)."""

    kind: str
    data: DataSpec | None = None  # default: the study's data
    seed: int | None = None  # default: the trial seed (fix it to share the stage across seeds)
    resources: Resources = Resources()
    fault: Fault | None = None  # testing only; not part of the stage's cache key
    # {hub id: commit (or branch, tag)} of the hub models its fields name (a judge, a generator, the
    # diversity tokenizer); default the default branch, pinned to its commit before planning.
    revisions: dict[str, str] = {}
    # The stage whose model this one starts from (trains, answers with, samples from): a stage listed
    # before it, or `base` (the study's model); default: the nearest model stage before it, else the
    # base model. Not in the stage's key as given: the key holds the input's own key (farm.plan).
    input: str | None = None

    shape: ClassVar[str] = "text"
    produces: ClassVar[str] = "model"
    trains: ClassVar[bool] = True  # trained under Ray Train; else run as one Ray task
    # Starts from a policy that already answers (preference and RL training, sampling answers): on a
    # model built with random weights it cannot be what a study means (Study._check_chain).
    needs_policy: ClassVar[bool] = False
    builds: ClassVar[str | None] = None  # a records stage: the shape of the records it builds
    # Values of its record that the study table shows beside the eval's metrics when it built the
    # evaluated model: what it trained on and how (farm.results.table).
    columns: ClassVar[tuple[str, ...]] = ()
    # Bump when the kind's code changes what it makes: its old artifacts stop matching (farm.plan). The
    # bundled assets (farm/assets) count as that code: a change to one bumps the kinds that read it.
    version: ClassVar[int] = 1
    run: ClassVar  # run(ctx: farm.train.base.StageContext) -> metrics: what the kind does (on a worker)

    def refs(self) -> dict[str, str]:
        """{field: value} of the fields that name another stage of the study or a model."""
        data = self.data.sources if self.data else []
        return {f"data.sources.{i}.stage": s.stage for i, s in enumerate(data) if s.name == "stage"}

    def hub_models(self, stages) -> list[str]:
        """The hub models its fields name (`stages`: the study's, which its other refs name)."""
        return hub_models(self.refs(), stages)

    def key_extra(self) -> dict:
        """What else its cache key must hold: the content of files its fields name, local models
        and tokenizers among them (its data's files are in the key's data part, farm.plan.data_key)."""
        files = {f: d for f, d in content(self).items() if not f.startswith("data.")}
        return {"files": files} if files else {}

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        """Its compute for `farm plan`: (kind of work, tokens, parameters of the model doing it) items
        for `seqs` sequences (rows times epochs, or steps times batch), `train` "lora" or "full", `base`
        the parameters of the model it starts from, `params(ref)` those of a model a field names; None
        when it cannot be told (farm.estimate turns the items into GPU-hours)."""
        return None

    def work_note(self) -> str:
        """What `farm plan` should say of its estimate of `work` (empty: nothing)."""
        return ""

    def memory(self, study, arch, model, where) -> Memory | None:
        """Peak GPU memory per GPU, for `farm plan` and the refusal before Ray (farm.estimate):
        `arch` the architecture of the model it starts from, `model(ref)` that of a model a field
        names (None: unknown), `where` the GPU it lands on (Memory's gpu, assumed, share). None: not
        estimated."""
        return None


def check_constitution(v: str) -> str:
    load_constitution(v)  # a ValueError naming the file and the field
    return v


def constitution_digest(v: str) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(load_constitution(v)), sort_keys=True).encode()).hexdigest()[:16]


class TrainingStage(StageSpec):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(128, ge=8)
    lora: LoRA | None = None
    # Weights and compute (farm.models.precision): auto is fp32 on a CPU; on a GPU a LoRA stage's
    # frozen base in bf16 with fp32 adapters, full fine-tuning with fp32 master weights and bf16
    # autocast. fp32 forces fp32 everywhere; bf16 asks for bf16 compute (a GPU that has it).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Recompute activations in the backward pass: less memory for ~1/3 more compute. None: on for
    # models of at least farm.models.CHECKPOINTING_PARAMS parameters. Not in the stage's key.
    gradient_checkpointing: bool | None = None
    # DeepSpeed for the HF trainer: a preset (farm.models.DEEPSPEED_PRESETS), a .json file or an
    # inline dict. A file is read here and kept as its dict: the cache key then holds what the
    # file says, not where it was, and Ray workers (other cwd, other node) need no copy of it.
    deepspeed: str | dict | None = None
    # Checkpoints to resume from (null: none). Not in the stage's key: it does not change the result.
    checkpoint_every: CheckpointEvery | None = CheckpointEvery()
    select: Select | None = None  # keep the checkpoint that scores best on the dev rows (default: the last)
    # The tokenizer the training prompts' diversity is counted with (farm.train.diversity): default the
    # stage's own; ScalingAlignment counts with LLaMA's (`data_preprocess/diversity.py`).
    diversity_tokenizer: str | None = None
    paths: ClassVar[tuple[str, ...]] = ("diversity_tokenizer",)
    sequences: ClassVar[int] = 1  # sequences a training example is, for its activations (farm plan)
    # The diversity of its training prompts (farm.train.diversity), and the step `select` kept.
    columns: ClassVar[tuple[str, ...]] = ("prompt_diversity", "selected_step")
    frozen_reference: ClassVar[bool] = False  # reads a frozen copy of its input model (none with LoRA: the adapter disabled)

    def refs(self) -> dict[str, str]:
        judge = self.select.reward_model if self.select else None
        return {**super().refs(), **({"select.reward_model": judge} if judge else {})}

    def hub_models(self, stages) -> list[str]:
        return hub_models({**self.refs(), "diversity_tokenizer": self.diversity_tokenizer}, stages)

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed(cls, v):
        if not isinstance(v, str) or v in DEEPSPEED_PRESETS:
            return v
        allowed = f"allowed: {', '.join(DEEPSPEED_PRESETS)}, a path to a .json file or an inline mapping"
        if not v.endswith(".json"):
            raise ValueError(f"unknown DeepSpeed config {v!r}; {allowed}")
        if not Path(v).expanduser().is_file():
            raise ValueError(f"deepspeed config file {v!r} does not exist; {allowed}")
        return deepspeed_config(v)  # a ValueError naming the file if it is not a JSON object

    @model_validator(mode="after")
    def _zero3_without_lora(self) -> "TrainingStage":
        zero3 = self.zero()[0] == 3
        if self.lora and zero3:
            # The artifact is the input model with the adapter merged in; under ZeRO-3 no rank holds
            # the whole model to merge into. LoRA's few trainable weights gain little from ZeRO-3.
            raise ValueError("deepspeed: ZeRO-3 with lora is not supported; use zero2 (it shards the optimizer state and gradients)")
        if self.select and zero3:
            # The best state is kept as a copy of the weights, which no rank holds whole under ZeRO-3.
            raise ValueError("select: checkpoint selection under ZeRO-3 is not supported; use zero2, or drop select")
        return self

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        return [(train, seqs * self.max_length, base)]

    def zero(self) -> tuple[int, bool]:
        """(ZeRO stage, offloaded) of its `deepspeed` field."""
        zero = (deepspeed_config(self.deepspeed) or {}).get("zero_optimization", {})
        return int(zero.get("stage", 0)), bool(zero.get("offload_optimizer") or zero.get("offload_param"))

    def examples(self, study) -> int | None:
        """Sequences one training example is (None: unknown)."""
        return self.sequences

    def held_and_phases(self, study, arch, model, weights: str) -> tuple[dict, dict, int, int | None] | None:
        """What it holds besides the model it trains, its phases besides training, the length of its
        sequences and the tokens its LM head scores (None: all); None if a model it reads is unknown."""
        held = {"reference": arch.params * READ_BYTES} if self.frozen_reference and not self.lora else {}
        return held, {}, self.max_length, None

    def memory(self, study, arch, model, where) -> Memory | None:
        if arch is None:
            return None
        weights, autocast = precision(self, on_gpu=True)
        trainable = lora_params(arch, self.lora.r, self.lora.target_modules) if self.lora else arch.params
        rows = self.examples(study)
        extra = self.held_and_phases(study, arch, model, weights)
        if trainable is None or rows is None or extra is None:
            return None
        held, phases, length, head_tokens = extra
        ckpt = checkpointing(self, arch.params)
        if self.select:  # rank 0 scores its checkpoints with the eval's generation and, for reward_score, the judge
            judge = model(self.select.reward_model) if self.select.reward_model else None
            if self.select.reward_model and judge is None:
                return None
            if judge is not None:
                held["judge (select)"] = judge.params * READ_BYTES
            phases["select"] = generating_as(arch, study.eval.generation, study.eval.max_prompt_length)
            phases["select"].pop("model", None)  # the model being trained is counted once
            if judge is not None:
                phases["select"]["judge forward"] = forward_pass(judge, study.eval.batch_size * study.eval.max_length)
        zero, offload = self.zero()
        step = training_step(arch, trainable, DTYPE_BYTES[weights], autocast is not None, self.batch_size * rows * length, ckpt,
                             lm_head=self.produces == "model", zero=zero, offload=offload, workers=self.resources.num_workers, head_tokens=head_tokens)  # fmt: skip
        phases["train"] = {"activations": step.pop("activations")}
        return Memory({**step, **held}, phases, **where, checkpointing=ckpt)
