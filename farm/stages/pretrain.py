"""`pretrain`: causal language modelling on text, so a model built from scratch learns some
language before it is aligned. Packed into full-length blocks by default; one text per sequence
with `packing: false` (Study C, as the seed trains)."""

from __future__ import annotations

from typing import ClassVar, Literal

from farm.registry import stages
from farm.schema import TrainingStage
from farm.train.base import StageContext, load_input, train_and_save, training_args


def pack(token_lists: list[list[int]], block: int, eos: int) -> list[list[int]]:
    """Concatenate documents (each ended by EOS) and cut the stream into blocks of `block` tokens."""
    stream = [t for ids in token_lists for t in (*ids, eos)]
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


def sequences(token_lists: list[list[int]], limit: int, eos: int) -> tuple[list[list[int]], int]:
    """(each text ended by EOS, how many were dropped): a text of `limit` tokens or more with its
    EOS is dropped whole, as the seed keeps only sentences whose tokens (tags and EOS included) are
    fewer than its context length (scripts/dataset_builder.py, `remove_sentences_over_length`)."""
    ended = [[*ids, eos] for ids in token_lists]
    kept = [r for r in ended if len(r) < limit]
    return kept, len(ended) - len(kept)


def rows(tok, texts: list[str], stage) -> tuple[list[list[int]], dict]:
    """The training sequences of `texts` in the stage's layout, and what the stage reports of them."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    if stage.packing:
        blocks = pack(ids, stage.max_length, tok.eos_token_id)
        return blocks, {"train_blocks": len(blocks)}
    kept, dropped = sequences(ids, stage.max_length, tok.eos_token_id)
    return kept, {"train_sequences": len(kept), "dropped_long": dropped}


def collator(tok):
    """TRL's collator: input_ids padded on the right with the pad id, labels with -100, so the loss
    skips exactly the padding. transformers' DataCollatorForLanguageModeling masks every label equal
    to the pad id instead, which also masks the real EOS where the pad is the EOS (GPT-2's tokenizer
    here); a packed block has no padding, so both give it the same labels."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)


def run(ctx: StageContext) -> dict:
    """Causal language modelling on text (packed blocks, or one row each)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, tok = load_input(ctx)
    train, stats = rows(tok, [r.text for r in ctx.records], ctx.stage)
    trainer = Trainer(
        model=model,
        args=training_args(ctx, TrainingArguments),
        train_dataset=Dataset.from_dict({"input_ids": train}),
        data_collator=collator(tok),
        processing_class=tok,
    )
    return {**train_and_save(trainer, ctx, tok), **stats}


@stages.register("pretrain")
class Pretrain(TrainingStage):
    """Causal language modelling on text. packing (default): the texts, each ended by EOS, run
    together and cut into blocks of `max_length` tokens. Off: one text per sequence, ended by EOS
    and padded to the batch with the padding out of the loss; a text of `max_length` tokens or more
    (with its EOS) is dropped, not cut. Off is Study C's layout, as the seed trains: one sentence
    per sequence, its control tags at position 0 (finetuning_llms_with_conditioning,
    scripts/train.py and scripts/dataset_builder.py `remove_sentences_over_length`)."""

    kind: Literal["pretrain"]
    run: ClassVar = staticmethod(run)
    packing: bool = True
    shape: ClassVar[str] = "text"

    def work_note(self) -> str:
        packed = self.packing and self.max_steps <= 0  # packed into blocks: a long row fills several
        return "packs whole rows: more tokens if rows are longer than max_length" if packed else ""
