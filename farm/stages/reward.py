"""`reward`: a scalar head on the input model, trained with TRL's RewardTrainer on comparisons.
A soft label p = P(chosen preferred) gives -[p log s(r_c - r_r) + (1 - p) log s(r_r - r_c)]."""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from pydantic import Field

from farm.models import as_reward_model, lora_config, reward_ids
from farm.registry import stages
from farm.schema import TrainingStage
from farm.train.base import StageContext, load_input, train_and_save, training_args

log = logging.getLogger(__name__)


def soft_reward_loss(r_chosen, r_rejected, p):
    """Batch mean of the soft Bradley-Terry loss; TRL's -log s(r_c - r_r) when p = 1."""
    import torch.nn.functional as F

    d = r_chosen - r_rejected
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


def _trainer_cls():
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            return {**super().torch_call(examples), "soft_label": torch.tensor([e["soft_label"] for e in examples], dtype=torch.float)}

    class SoftRewardTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "soft_label" not in self._signature_columns:  # else the Trainer drops the column
                self._signature_columns = [*self._signature_columns, "soft_label"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p = inputs.pop("soft_label")
            # TRL's pass logs accuracy, margin and rewards; its hard-label loss is replaced.
            _, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            r_chosen, r_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = soft_reward_loss(r_chosen, r_rejected, p.to(r_chosen.dtype))
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
            return (loss, outputs) if return_outputs else loss

    return SoftRewardTrainer, SoftCollator


def run(ctx: StageContext) -> dict:
    """A reward model on comparisons (TRL RewardTrainer, Bradley-Terry; soft labels from AI feedback)."""
    from datasets import Dataset
    from trl import RewardConfig

    lm, tok = load_input(ctx)
    model = as_reward_model(lm, tok, ctx.seed)
    del lm
    s = ctx.stage
    # Token ids cut and joined as farm.models.reward_scores scores them: TRL re-tokenizing
    # decoded text could grow past max_length (a cut multi-byte character) and be filtered out.
    cols: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "soft_label": []}
    for r in ctx.records:
        for col, response in (("chosen_ids", r.chosen), ("rejected_ids", r.rejected)):
            cols[col].append(reward_ids(tok, r.prompt, response, s.max_length, s.max_prompt_length))
        cols["soft_label"].append(float(r.label))
    trainer_cls, collator_cls = _trainer_cls()
    trainer = trainer_cls(
        model=model,
        args=training_args(ctx, RewardConfig, max_length=s.max_length, center_rewards_coefficient=s.center_rewards_coefficient),
        data_collator=collator_cls(pad_token_id=tok.pad_token_id),
        train_dataset=Dataset.from_dict(cols),
        processing_class=tok,
        peft_config=lora_config(s.lora, model, task_type="SEQ_CLS") if s.lora else None,  # SEQ_CLS trains the head too
    )
    # TRL drops pairs longer than max_length (possible only when max_prompt_length >= max_length - 1).
    dropped = len(ctx.records) - len(trainer.train_dataset)
    if dropped == len(ctx.records):
        raise ValueError(f"reward stage {ctx.name!r}: all {dropped} pairs exceed max_length={s.max_length}")
    if dropped:
        log.warning("reward stage %r: %d of %d pairs exceed max_length=%d and are left out", ctx.name, dropped, len(ctx.records), s.max_length)
    metrics = train_and_save(trainer, ctx, tok)
    accuracy = [e["accuracy"] for e in trainer.state.log_history if "accuracy" in e]
    return {**metrics, "train_accuracy": accuracy[-1]} if accuracy else metrics


@stages.register("reward")
class Reward(TrainingStage):
    """A reward model (TRL RewardTrainer): a scalar head on the input model, trained on
    comparisons with the Bradley-Terry loss; a soft label p (AI feedback) gives
    -[p log s(r_c - r_r) + (1 - p) log s(r_r - r_c)], which is the usual loss when p = 1."""

    kind: Literal["reward"]
    run: ClassVar = staticmethod(run)
    max_prompt_length: int = Field(96, ge=1)
    center_rewards_coefficient: float | None = Field(None, ge=0)  # pull rewards towards 0 (Eisenstein et al.)
    shape: ClassVar[str] = "comparison"
    produces: ClassVar[str] = "reward_model"
    sequences: ClassVar[int] = 2  # chosen and rejected

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        return [(train, seqs * 2 * self.max_length, base)]  # chosen and rejected
