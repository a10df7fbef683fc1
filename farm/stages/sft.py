"""`sft`: TRL SFTTrainer on prompt/completion pairs; the loss falls on the completion only."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from farm.models import encode_pair
from farm.registry import stages
from farm.schema import TrainingStage
from farm.train.base import StageContext, load_input, peft_config, train_and_save, training_args


def run(ctx: StageContext) -> dict:
    """Supervised fine-tuning on demonstrations (TRL SFTTrainer), the loss on the answers."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = load_input(ctx)
    s = ctx.stage
    # Token ids, not text: TRL trains on exactly the ids eval scores (farm.models.encode_pair
    # tokenizes as TRL does, then cuts; TRL re-tokenizing a decoded cut could differ).
    pairs = [encode_pair(tok, r.prompt, r.response, s.max_length, s.max_prompt_length) for r in ctx.records]
    data = {"input_ids": [p + c for p, c in pairs], "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in pairs]}
    trainer = SFTTrainer(
        model=model,
        args=training_args(ctx, SFTConfig, max_length=s.max_length, completion_only_loss=True),
        train_dataset=Dataset.from_dict(data),
        processing_class=tok,
        peft_config=peft_config(ctx, model),
    )
    return train_and_save(trainer, ctx, tok)


@stages.register("sft")
class SFT(TrainingStage):
    kind: Literal["sft"]
    run: ClassVar = staticmethod(run)
    max_prompt_length: int = Field(96, ge=1)
    shape: ClassVar[str] = "demonstration"
