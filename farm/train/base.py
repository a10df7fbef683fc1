"""What every training stage shares: its context, its TrainingArguments, and how it saves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.eval.metrics import encode_pair
from farm.models import base_model, deepspeed_config, load_artifact, lora_config


@dataclass
class StageContext:
    name: str
    stage: Any  # the validated stage spec (farm.spec.StageSpec subclass)
    model_spec: Any  # the study's model section, for a stage that starts from the base model
    seed: int
    input_path: Path | None  # the previous stage's artifact; None: start from the base model
    records: list  # training records, already perturbed and in the stage's shape
    output_dir: Path  # where the artifact is saved (a temporary folder, renamed when complete)
    work_dir: Path  # the trainer's scratch output_dir
    callbacks: list
    special_tokens: list = field(default_factory=list)  # added to the vocabulary (control tokens)
    inputs: dict = field(default_factory=dict)  # {stage name: artifact path} of the other stages it reads


def model_ref(ctx: StageContext, ref: str) -> str:
    """A field naming a model: the artifact of that stage of the study, or a hub id / local path."""
    return str(ctx.inputs.get(ref, ref))


def load_input(ctx: StageContext):
    """The model and tokenizer the stage starts from, with the special tokens its data adds
    (control tokens) joined to the vocabulary and the embeddings resized to match."""
    model, tok = base_model(ctx.model_spec, ctx.seed) if ctx.input_path is None else load_artifact(ctx.input_path)
    new = [t for t in ctx.special_tokens if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
        model.resize_token_embeddings(len(tok))
    return model, tok


def training_args(ctx: StageContext, config_cls, **extra):
    import torch

    s = ctx.stage
    cpu = not torch.cuda.is_available() or s.resources.gpus_per_worker == 0
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
        save_strategy="no",  # the farm saves the final model itself, atomically
        report_to=[],
        disable_tqdm=True,
        use_cpu=cpu,  # TRL configs default to bf16, which fails on CPU; also makes DDP over gloo work
        bf16=not cpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=False,
        deepspeed=deepspeed_config(s.deepspeed, check_installed=True),  # a preset name becomes its dict
        dataloader_num_workers=0,
        **extra,
    )


def _logging_steps(ctx: StageContext) -> int:
    s = ctx.stage
    per_step = s.batch_size * s.grad_accum * s.resources.num_workers
    steps = s.max_steps if s.max_steps > 0 else int(s.epochs * len(ctx.records) / per_step)
    return max(1, steps // 10)


def fit_pair(tok, prompt: str, response: str, stage) -> tuple[str, str]:
    """Cut a pair as eval does (the prompt keeps its end), leaving room for EOS; TRL re-tokenizes the text."""
    p, r = encode_pair(tok, prompt, response, stage.max_length - 1, stage.max_prompt_length)
    return tok.decode(p), tok.decode(r)


def peft_config(ctx: StageContext, model):
    return lora_config(ctx.stage.lora, model) if ctx.stage.lora else None


def train_and_save(trainer, ctx: StageContext, tokenizer) -> dict:
    """Train under Ray Train, then save (rank 0) a plain HF model folder: LoRA adapters are
    saved under adapter/ and merged into the saved weights, so every artifact loads alike."""
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import PrinterCallback

    trainer = prepare_trainer(trainer)
    trainer.remove_callback(PrinterCallback)  # progress goes through ctx.callbacks instead
    for cb in ctx.callbacks:
        trainer.add_callback(cb)
    result = trainer.train()
    # ZeRO-3 shards the weights over the workers: all of them take part in gathering the whole state
    # dict (the presets set stage3_gather_16bit_weights_on_model_save), rank 0 writes it.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_deepspeed_enabled else None
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):  # (never under ZeRO-3: the spec refuses it with LoRA)
            model.save_pretrained(str(ctx.output_dir / "adapter"))
            model, state = model.merge_and_unload(), None
        model.save_pretrained(str(ctx.output_dir), state_dict=state)
        tokenizer.save_pretrained(str(ctx.output_dir))
    from farm.eval.diversity import prompt_diversity_of

    prompts = [r.prompt for r in ctx.records if hasattr(r, "prompt")]
    return {
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_seconds": result.metrics.get("train_runtime"),
        "train_rows": len(ctx.records),
        **({"prompt_diversity": prompt_diversity_of(tokenizer, prompts)} if prompts else {}),
    }
