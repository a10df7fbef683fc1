"""`dpo`: TRL DPOTrainer on comparisons. With LoRA the reference is the same model with the
adapter disabled; without, TRL keeps a frozen copy of the input model."""

from __future__ import annotations

import copy

from farm.registry import stages
from farm.train.base import StageContext, fit_pair, load_input, peft_config, train_and_save, training_args


@stages.register("dpo")
def run(ctx: StageContext) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = load_input(ctx)
    s = ctx.stage
    cols: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for r in ctx.records:
        prompt, chosen = fit_pair(tok, r.prompt, r.chosen, s)
        cols["prompt"].append(prompt)
        cols["chosen"].append(chosen)
        cols["rejected"].append(fit_pair(tok, r.prompt, r.rejected, s)[1])
    args = training_args(
        ctx,
        DPOConfig,
        max_length=s.max_length,
        beta=s.beta,
        label_smoothing=s.label_smoothing,
        loss_type=[s.loss_type],
    )
    lora = peft_config(ctx, model)
    trainer = DPOTrainer(
        model=model,
        # Without LoRA the reference is a frozen copy of the input model (TRL would reload it
        # from its hub name, which a built model does not have).
        ref_model=None if lora else copy.deepcopy(model).eval(),
        args=args,
        train_dataset=Dataset.from_dict(cols),
        processing_class=tok,
        peft_config=lora,
    )
    return train_and_save(trainer, ctx, tok)
