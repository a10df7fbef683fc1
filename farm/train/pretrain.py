"""`pretrain`: causal language modelling on text, packed into full-length blocks, so a model
built from scratch learns some language before it is aligned."""

from __future__ import annotations

from farm.registry import stages
from farm.train.base import StageContext, load_input, train_and_save, training_args


def pack(token_lists: list[list[int]], block: int, eos: int) -> list[list[int]]:
    """Concatenate documents (each ended by EOS) and cut the stream into blocks of `block` tokens."""
    stream = [t for ids in token_lists for t in (*ids, eos)]
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


@stages.register("pretrain")
def run(ctx: StageContext) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model, tok = load_input(ctx)
    ids = tok([r.text for r in ctx.records], add_special_tokens=False)["input_ids"]
    blocks = pack(ids, ctx.stage.max_length, tok.eos_token_id)
    trainer = Trainer(
        model=model,
        args=training_args(ctx, TrainingArguments),
        train_dataset=Dataset.from_dict({"input_ids": blocks}),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    return {**train_and_save(trainer, ctx, tok), "train_blocks": len(blocks)}
