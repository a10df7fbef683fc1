"""`dpo`: TRL DPOTrainer on comparisons. With LoRA the reference is the same model with the
adapter disabled; without, TRL keeps a frozen copy of the input model. Any of TRL's loss types
(`farm.spec.DPO_LOSSES`), or a weighted sum of them; the spec refuses a `label_smoothing` that
the chosen losses would not read."""

from __future__ import annotations

import copy

from farm.models import common_prefix, encode_pair, inference_dtype
from farm.registry import stages
from farm.train.base import StageContext, load_input, on_gpu, peft_config, train_and_save, training_args


def dpo_trainer_class():
    """TRL's DPOTrainer, taking token ids the farm made: its own preparation would tokenize text
    again (TRL 1.16 has no pre-tokenized path for DPO)."""
    from trl import DPOTrainer

    class TokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return TokenizedDPOTrainer


def preference_ids(tok, records, s) -> dict[str, list]:
    """prompt_ids / chosen_ids / rejected_ids columns, each pair cut as eval cuts it."""
    cols: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for r in records:
        prompt, chosen = encode_pair(tok, r.prompt, r.chosen, s.max_length, s.max_prompt_length)
        prompt_r, rejected = encode_pair(tok, r.prompt, r.rejected, s.max_length, s.max_prompt_length)
        if prompt_r != prompt:  # a token merged across the boundary: the prompt is what both share
            n = common_prefix(prompt, prompt_r)
            chosen, rejected = prompt[n:] + chosen, prompt_r[n:] + rejected
            prompt = prompt[:n]
        cols["prompt_ids"].append(prompt)
        cols["chosen_ids"].append(chosen)
        cols["rejected_ids"].append(rejected)
    return cols


def frozen_copy(ctx: StageContext, model):
    """A frozen copy of the input model as a reference: in bf16 on a GPU (it is only read)."""
    import torch

    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return ref.to(inference_dtype(torch.device("cuda"))) if on_gpu(ctx) else ref


def train_against_reference(ctx: StageContext, model, tok, trainer_cls, args, columns: dict[str, list]) -> dict:
    """Train a TRL preference trainer that takes the farm's token ids (`columns`) against the input
    model: with LoRA the reference is the adapter disabled; without, a frozen copy of the input
    model (TRL would reload it from its hub name, which a built model does not have)."""
    from datasets import Dataset

    lora = peft_config(ctx, model)
    trainer = trainer_cls(
        model=model,
        ref_model=None if lora else frozen_copy(ctx, model),
        args=args,
        train_dataset=Dataset.from_dict(columns),
        processing_class=tok,
        peft_config=lora,
    )
    return train_and_save(trainer, ctx, tok)


@stages.register("dpo")
def run(ctx: StageContext) -> dict:
    """Direct Preference Optimization on comparisons (TRL DPOTrainer) against a frozen reference."""
    from trl import DPOConfig

    model, tok = load_input(ctx)
    s = ctx.stage
    args = training_args(
        ctx,
        DPOConfig,
        max_length=s.max_length,
        beta=s.beta,
        label_smoothing=s.label_smoothing,
        loss_type=list(s.losses()),
        loss_weights=list(s.losses().values()),
    )
    return train_against_reference(ctx, model, tok, dpo_trainer_class(), args, preference_ids(tok, ctx.records, s))
