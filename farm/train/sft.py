"""`sft`: TRL SFTTrainer on prompt/completion pairs; the loss falls on the completion only."""

from __future__ import annotations

from farm.registry import stages
from farm.train.base import StageContext, fit_pair, load_input, peft_config, train_and_save, training_args


@stages.register("sft")
def run(ctx: StageContext) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = load_input(ctx)
    s = ctx.stage
    pairs = [fit_pair(tok, r.prompt, r.response, s) for r in ctx.records]
    data = {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]}
    trainer = SFTTrainer(
        model=model,
        args=training_args(ctx, SFTConfig, max_length=s.max_length, completion_only_loss=True),
        train_dataset=Dataset.from_dict(data),
        processing_class=tok,
        peft_config=peft_config(ctx, model),
    )
    return train_and_save(trainer, ctx, tok)
