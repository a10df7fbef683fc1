"""What every training stage shares: its context, its TrainingArguments, and how it saves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.models import (
    BASE_FILE,
    base_model,
    checkpointing,
    deepspeed_config,
    device,
    for_inference,
    fp32_trainables,
    inference_dtype,
    load_artifact,
    lora_config,
    precision,
)
from farm.train import logprob
from farm.train.diversity import counting_tokenizer, prompt_diversity_of


@dataclass
class StageContext:
    name: str
    stage: Any  # the validated stage spec (farm.schema.StageSpec subclass)
    model_spec: Any  # the study's model section, for a stage that starts from the base model
    seed: int
    input_path: Path | None  # the previous stage's artifact; None: start from the base model
    records: list  # training records, already perturbed and in the stage's shape
    output_dir: Path  # where the artifact is saved (a temporary folder, renamed when complete)
    work_dir: Path  # the trainer's scratch output_dir
    callbacks: list
    special_tokens: list = field(default_factory=list)  # added to the vocabulary (control tokens)
    inputs: dict = field(default_factory=dict)  # {stage name: artifact path} of the other stages it reads
    resolve: Any = None  # (kind, key) -> the store's local path of an artifact
    grown: bool = False  # load_input added tokens to the vocabulary (set by load_input)
    params: int | None = None  # the input model's parameters (set by load_input)

    def base_ref(self) -> dict:
        """What a LoRA adapter of this stage applies to (farm.models.BASE_FILE): the input
        artifact's {"stage": [kind, key]} (the store names it <kind>-<key>), or the study's model."""
        if self.input_path is None:
            return {"model": self.model_spec.model_dump(mode="json"), "seed": self.seed}
        return {"stage": Path(self.input_path).name.split("-", 1)}


def model_ref(ctx: StageContext, ref: str) -> str:
    """A field naming a model: the artifact of that stage of the study, or a hub id / local path."""
    return str(ctx.inputs.get(ref, ref))


def inference_model(ctx: StageContext, ref: str, reward: bool = False):
    """(model, tokenizer) of the model a field names, for inference (`farm.models.for_inference`); a
    hub id at the commit the stage pins for it (`revisions`)."""
    return for_inference(model_ref(ctx, ref), ctx.resolve, reward=reward, revision=ctx.stage.revisions.get(ref))


def on_gpu(ctx: StageContext) -> bool:
    """Whether this worker trains on a GPU: one that Ray allocated to it (an error if torch cannot
    see it), never one merely present on the node."""
    return ctx.stage.resources.gpus_per_worker > 0 and device().type == "cuda"


def load_input(ctx: StageContext):
    """The model and tokenizer the stage starts from, its weights in the stage's precision (a LoRA
    adapter it starts from merged in), with the special tokens its data adds (control tokens)
    joined to the vocabulary and the embeddings resized to match."""
    import torch

    # A stage that builds records only reads its model: it loads as eval does.
    dtype = getattr(torch, precision(ctx.stage, on_gpu(ctx))[0]) if ctx.stage.trains else inference_dtype(device())
    if ctx.input_path is None:
        model, tok = base_model(ctx.model_spec, ctx.seed, dtype)
    else:
        model, tok = load_artifact(ctx.input_path, dtype, ctx.resolve)
    new = [t for t in ctx.special_tokens if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
        model.resize_token_embeddings(len(tok))
        ctx.grown = True
    ctx.params = sum(p.numel() for p in model.parameters())
    return model, tok


def training_args(ctx: StageContext, config_cls, **extra):
    s = ctx.stage
    cpu = not on_gpu(ctx)
    autocast = precision(s, not cpu)[1]
    return config_cls(
        output_dir=str(ctx.work_dir),
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=s.weight_decay,
        seed=ctx.seed,
        data_seed=ctx.seed,
        logging_steps=_logging_steps(ctx),
        # The farm saves the final model itself, atomically; checkpoints to resume from are saved
        # when farm.train.checkpoints' callback asks (every N steps or minutes, into the store).
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=cpu,  # TRL configs default to bf16, which fails on CPU; also makes DDP over gloo work
        bf16=autocast == "bfloat16",  # fp32 (or LoRA's bf16 base) weights, bf16 compute
        activation_checkpointing=checkpointing(s, ctx.params),
        # Non-reentrant: it needs no input that requires grad, which a LoRA model's frozen
        # embeddings do not give.
        activation_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=deepspeed_config(s.deepspeed, check_installed=True, cpu=cpu),  # a preset name becomes its dict
        dataloader_num_workers=0,
        **extra,
    )


def _logging_steps(ctx: StageContext) -> int:
    s = ctx.stage
    per_step = s.batch_size * s.grad_accum * s.resources.num_workers
    steps = s.max_steps if s.max_steps > 0 else int(s.epochs * len(ctx.records) / per_step)
    return max(1, steps // 10)


def peft_config(ctx: StageContext, model):
    return lora_config(ctx.stage.lora, model) if ctx.stage.lora else None


def train_and_save(trainer, ctx: StageContext, tokenizer) -> dict:
    """Train under Ray Train, then save (rank 0) the artifact: a plain HF model folder, or for a
    LoRA stage its adapter (adapter/, MBs rather than a 7B model's 13.5 GB) and the name of the
    model it applies to (farm.models.BASE_FILE), which every consumer loads as base + adapter."""
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import PrinterCallback

    # transformers at its import: every stage kind imports this module, and validating a study imports every kind
    from farm.train.checkpoints import resume_from

    trainer = prepare_trainer(trainer)
    trainer.remove_callback(PrinterCallback)  # progress goes through ctx.callbacks instead
    for cb in ctx.callbacks:
        trainer.add_callback(cb)
    fp32_trainables(trainer.model)  # before train() builds the optimizer over them
    logprob.install()  # the plain LM head where TRL's chunked kernel does not pay

    result = trainer.train(resume_from_checkpoint=resume_from(ctx))  # optimizer, scheduler, RNG, data position
    # ZeRO-3 shards the weights over the workers: all of them take part in gathering the whole state
    # dict (the presets set stage3_gather_16bit_weights_on_model_save), rank 0 writes it.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_deepspeed_enabled else None
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        lora = hasattr(model, "merge_and_unload")  # (never under ZeRO-3: the spec refuses it with LoRA)
        if lora and not ctx.grown:
            model.save_pretrained(str(ctx.output_dir / "adapter"))
            (ctx.output_dir / BASE_FILE).write_text(json.dumps(ctx.base_ref(), sort_keys=True))
        else:
            # Token embeddings this stage added are not in a LoRA adapter (they were initialised
            # here, at random): such a stage keeps its whole merged model.
            if lora:
                model, state = model.merge_and_unload(), None
            model.save_pretrained(str(ctx.output_dir), state_dict=state)
        tokenizer.save_pretrained(str(ctx.output_dir))

    prompts = [r.prompt for r in ctx.records if hasattr(r, "prompt")]
    counted = ctx.stage.diversity_tokenizer
    return {
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_seconds": result.metrics.get("train_runtime"),
        "train_rows": len(ctx.records),
        # How it trained: the workers that shared the data and, under DeepSpeed, the ZeRO stage
        # its engine ran (the config's stage says what was asked; this, what ran).
        "train_world_size": trainer.args.world_size,
        **({"zero_stage": trainer.model_wrapped.zero_optimization_stage()} if trainer.is_deepspeed_enabled else {}),
        **(
            {
                "prompt_diversity": prompt_diversity_of(
                    counting_tokenizer(counted, ctx.stage.revisions.get(counted)) if counted else tokenizer, prompts
                )
            }
            if prompts
            else {}
        ),
    }
