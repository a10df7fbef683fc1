"""`kto`: TRL KTOTrainer on comparisons, unpaired as KTO's paper does with paired data (each
chosen answer a desirable example, each rejected one an undesirable example). The farm tokenizes
(as for DPO: the pair's prompt, each answer cut as eval cuts it; the reference as DPO's), shuffles the examples with the
stage's seed (TRL reads them in order: its KL term pairs each example with its batch neighbour's
answer) and builds the mismatched answers itself, as TRL's own preparation would."""

from __future__ import annotations

import random
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from farm.registry import stages
from farm.schema import TrainingStage
from farm.stages.dpo import preference_ids, train_against_reference
from farm.train.base import StageContext, load_input, training_args


def unpaired(cols: dict[str, list], batch_size: int, seed: int, kl: bool) -> dict[str, list]:
    """prompt_ids / completion_ids / label columns from preference_ids' columns, in one seeded
    order; with `kl`, KL_completion_ids: each batch's answers rotated by one (TRL's
    `add_kl_completion_ids`: example i is scored against answer i - 1 of its batch)."""
    examples = [(p, c, True) for p, c in zip(cols["prompt_ids"], cols["chosen_ids"])]
    examples += [(p, r, False) for p, r in zip(cols["prompt_ids"], cols["rejected_ids"])]
    random.Random(seed).shuffle(examples)
    out = {"prompt_ids": [e[0] for e in examples], "completion_ids": [e[1] for e in examples], "label": [e[2] for e in examples]}
    if kl:
        answers = out["completion_ids"]
        batches = [answers[i : i + batch_size] for i in range(0, len(answers), batch_size)]
        out["KL_completion_ids"] = [a for b in batches for a in [b[-1], *b[:-1]]]
    return out


def kto_trainer_class():
    """TRL's KTOTrainer, taking the examples the farm made (its own preparation would tokenize
    text again)."""
    from trl import KTOTrainer

    class TokenizedKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return TokenizedKTOTrainer


def run(ctx: StageContext) -> dict:
    """Kahneman-Tversky Optimization on comparisons unpaired into desirable and undesirable answers (TRL KTOTrainer)."""
    from trl import KTOConfig

    model, tok = load_input(ctx)
    s = ctx.stage
    args = training_args(
        ctx,
        KTOConfig,
        max_length=s.max_length,
        beta=s.beta,
        loss_type=s.loss_type,
        desirable_weight=s.desirable_weight,
        undesirable_weight=s.undesirable_weight,
    )
    data = unpaired(preference_ids(tok, ctx.records, s), s.batch_size, ctx.seed, kl=s.loss_type == "kto")
    return train_against_reference(ctx, model, tok, kto_trainer_class(), args, data)


@stages.register("kto")
class KTO(TrainingStage):
    """TRL KTOTrainer (Kahneman-Tversky Optimization, Ethayarajh et al. 2024) on comparisons, each
    unpaired as KTO's paper does with paired data: the chosen answer a desirable example, the
    rejected one an undesirable example, shuffled with the stage's seed. `loss_type`: `kto`
    (its KL term from mismatched prompt-answer pairs within a batch, so `batch_size` > 1) or
    `apo_zero_unpaired`. `desirable_weight` / `undesirable_weight`: KTO's lambda_D / lambda_U."""

    kind: Literal["kto"]
    run: ClassVar = staticmethod(run)
    max_prompt_length: int = Field(96, ge=1)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    shape: ClassVar[str] = "comparison"
    needs_policy: ClassVar[bool] = True
    frozen_reference: ClassVar[bool] = True

    @model_validator(mode="after")
    def _kl_needs_a_batch(self) -> "KTO":
        if self.loss_type == "kto" and self.batch_size < 2:
            raise ValueError(
                "batch_size: loss_type kto estimates its KL term from the other answers of a batch, so it needs batch_size >= 2 "
                "(per worker; grad_accum does not count); or set loss_type: apo_zero_unpaired"
            )
        return self

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        # each answer an example, trained on and read by the reference; with the KL term a mismatched
        # answer is read by both too
        examples = seqs if self.max_steps > 0 else seqs * 2
        forwards = 3 if self.loss_type == "kto" else 1
        return [(train, examples * self.max_length, base), ("forward", examples * forwards * self.max_length, base)]
