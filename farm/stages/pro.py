"""`pro`: Preference Ranking Optimization (Song et al. 2023) on rankings, best answer first.
A `transformers.Trainer` subclass with its own loss, since TRL has no PRO trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field

from farm.models import encode_pair
from farm.registry import stages
from farm.schema import TrainingStage
from farm.train.base import StageContext, load_input, peft_config, train_and_save, training_args


def pro_loss(logp_mean, logp_sum_best, rewards, sft_weight: float = 0.05):
    """PRO loss of a batch of rankings sorted best first.

    logp_mean [B, k]: mean token log-prob s_i of each candidate's response; logp_sum_best [B]:
    summed token log-prob of the best response; rewards [B, k]: r_1 >= ... >= r_k.
    L = sum_j L_j + sft_weight (k-1)^2 L_SFT, each term averaged over the batch; for k = 1
    (where that weight is 0) it is plain SFT on the best response."""
    import torch

    sft = -logp_sum_best.mean()
    k = logp_mean.shape[1]
    if k == 1:
        return sft
    total = logp_mean.new_zeros(())
    for j in range(k - 1):
        # Reward gaps act as temperatures: a clearly worse candidate is pushed down harder.
        gaps = rewards[:, j : j + 1] - rewards[:, j + 1 :]
        logits = torch.cat([logp_mean[:, j : j + 1] * gaps.max(-1, keepdim=True).values, logp_mean[:, j + 1 :] * gaps], -1)
        total = total + (torch.logsumexp(logits, -1) - logits[:, 0]).mean()
    return total + sft_weight * (k - 1) ** 2 * sft


@dataclass
class RankingCollator:
    """Pads examples {prompt_ids, response_ids (k lists each), rewards [k]} into input_ids,
    attention_mask and response_mask [B, k, L] (right padding) and rewards [B, k]."""

    pad_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        seqs = [list(zip(e["prompt_ids"], e["response_ids"])) for e in examples]
        width = max(len(p) + len(r) for cands in seqs for p, r in cands)
        shape = (len(seqs), len(seqs[0]), width)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention = torch.zeros(shape, dtype=torch.long)
        response = torch.zeros(shape, dtype=torch.long)
        for b, cands in enumerate(seqs):
            for c, (p, r) in enumerate(cands):
                ids[b, c, : len(p) + len(r)] = torch.tensor(p + r)
                attention[b, c, : len(p) + len(r)] = 1
                response[b, c, len(p) : len(p) + len(r)] = 1
        rewards = torch.tensor([e["rewards"] for e in examples], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": attention, "response_mask": response, "rewards": rewards}


def pro_trainer_class():
    """The PROTrainer class, built on first use so that importing this module stays light."""
    from transformers import Trainer

    class PROTrainer(Trainer):
        # pro_loss is a per-batch mean: the Trainer still divides it over accumulation steps.
        loss_is_scaled_for_ga = False

        def __init__(self, *args, sft_weight: float = 0.05, **kwargs):
            super().__init__(*args, **kwargs)
            self.sft_weight = sft_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            ids = inputs["input_ids"]
            b, k, length = ids.shape
            flat = ids.view(b * k, length)
            # One forward pass over every candidate of the batch.
            logits = model(input_ids=flat, attention_mask=inputs["attention_mask"].view(b * k, length)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, flat[:, 1:, None]).squeeze(-1)
            mask = inputs["response_mask"].view(b * k, length)[:, 1:].to(logp.dtype)
            sums = (logp * mask).sum(-1).view(b, k)
            means = sums / mask.sum(-1).clamp(min=1).view(b, k)
            loss = pro_loss(means, sums[:, 0], inputs["rewards"], self.sft_weight)
            return (loss, {}) if return_outputs else loss

    return PROTrainer


def run(ctx: StageContext) -> dict:
    """Preference Ranking Optimization on rankings (Song et al. 2023), the authors' list-wise loss."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import TrainingArguments

    lengths = {len(r.responses) for r in ctx.records}
    if len(lengths) > 1:
        raise ValueError(f"pro: every ranking of a trial must have one length; got lengths {sorted(lengths)}")
    model, tok = load_input(ctx)
    s = ctx.stage
    cols: dict[str, list] = {"prompt_ids": [], "response_ids": [], "rewards": []}
    keep = 1 if s.objective == "sft" else None  # the best answer alone: PRO at k = 1
    for r in ctx.records:
        # Each candidate as TRL's trainers and eval tokenize a pair (its EOS included).
        pairs = [encode_pair(tok, r.prompt, resp, s.max_length, s.max_prompt_length) for resp in r.responses[:keep]]
        cols["prompt_ids"].append([p for p, _ in pairs])
        cols["response_ids"].append([resp for _, resp in pairs])
        cols["rewards"].append(list(r.rewards[:keep]))
    lora = peft_config(ctx, model)
    trainer = pro_trainer_class()(
        model=get_peft_model(model, lora) if lora else model,
        args=training_args(ctx, TrainingArguments, remove_unused_columns=False),
        train_dataset=Dataset.from_dict(cols),
        data_collator=RankingCollator(tok.pad_token_id),
        processing_class=tok,
        sft_weight=s.sft_weight,
    )
    return train_and_save(trainer, ctx, tok)


@stages.register("pro")
class PRO(TrainingStage):
    """Preference Ranking Optimization (Song et al. 2023) on rankings: list-wise terms with
    reward-difference temperatures plus `sft_weight` (n-1)^2 times the SFT loss of the best answer."""

    kind: Literal["pro"]
    run: ClassVar = staticmethod(run)
    max_prompt_length: int = Field(96, ge=1)
    sft_weight: float = Field(0.05, ge=0)
    # sft: train on each ranking's best answer alone, PRO at k = 1: the summed NLL of the best answer
    # per example, ScalingAlignment's SFT baseline (`train_hh_sft_1b3.sh`: training_stage_num 1 on the
    # same length-k data). TRL's SFT (a stage of kind sft) averages over tokens instead.
    objective: Literal["pro", "sft"] = "pro"
    shape: ClassVar[str] = "ranking"
    needs_policy: ClassVar[bool] = True

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        k = self.ranking_length(study)  # every candidate of a ranking
        return [(train, seqs * k * self.max_length, base)] if k else None

    def ranking_length(self, study) -> int | None:
        """Candidates per ranking it reads: its ranking subset's length, else all that the rank stage
        it reads built (2 + samples)."""
        data = self.data or study.data
        subset = next((t for t in data.transforms if t.name == "ranking_subset"), None)
        builders = [study.stages[x.stage] for x in data.sources if x.name == "stage"]
        return subset.ranking_length if subset else max((2 + b.samples for b in builders if b.kind == "rank"), default=None)

    def examples(self, study) -> int | None:
        return self.ranking_length(study)  # every candidate of a ranking
