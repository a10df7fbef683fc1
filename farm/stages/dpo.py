"""`dpo`: TRL DPOTrainer on comparisons. With LoRA the reference is the same model with the
adapter disabled; without, TRL keeps a frozen copy of the input model. Any of TRL's loss types
(`DPO_LOSSES` below), or a weighted sum of them; the `DPO` class refuses a `label_smoothing` that
the chosen losses would not read."""

from __future__ import annotations

import copy
from typing import ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from farm.models import common_prefix, encode_pair, inference_dtype
from farm.registry import stages
from farm.schema import TrainingStage
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


# The loss types of TRL 1.16's DPOTrainer (the branches of `DPOTrainer._compute_loss`; TRL names
# them in DPOConfig's help but exports no list). tests/test_dpo_losses.py checks this against the
# installed TRL, so an upgrade that adds or drops one fails there.
DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


# Those that read `label_smoothing` in TRL 1.16: robust (the chance a preference label is flipped),
# exo_pair (EXO's epsilon), aot and aot_unpaired. Since TRL's DPO refactor `sigmoid` ignores it:
# conservative DPO, -(1 - e) log s(h) - e log s(-h), is no loss type of TRL 1.16.
DPO_SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


DPOLoss = Literal[DPO_LOSSES]


@stages.register("dpo")
class DPO(TrainingStage):
    """TRL DPOTrainer. `loss_type`: one of TRL's loss types, a list of them (summed), or a mapping
    {loss type: weight} for a weighted sum (TRL's `loss_weights`; MPO is {sigmoid: 0.8, bco_pair:
    0.2, sft: 1.0})."""

    kind: Literal["dpo"]
    run: ClassVar = staticmethod(run)
    max_prompt_length: int = Field(96, ge=1)
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, le=0.5)  # only for DPO_SMOOTHED_LOSSES
    loss_type: Union[DPOLoss, list[DPOLoss], dict[DPOLoss, float]] = "sigmoid"
    shape: ClassVar[str] = "comparison"
    needs_policy: ClassVar[bool] = True
    sequences: ClassVar[int] = 2  # chosen and rejected
    frozen_reference: ClassVar[bool] = True

    def losses(self) -> dict[str, float]:
        """{loss type: weight}: TRL's `loss_type` and `loss_weights`."""
        if isinstance(self.loss_type, dict):
            return dict(self.loss_type)
        return dict.fromkeys([self.loss_type] if isinstance(self.loss_type, str) else self.loss_type, 1.0)

    @field_validator("loss_type", mode="before")
    @classmethod
    def _known_losses(cls, v):
        # One message naming the problem, rather than pydantic's one per member of the union.
        names = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, dict)) else []
        if not names:
            raise ValueError(f"a loss type, a list of them or a mapping {{loss type: weight}}; TRL 1.16's loss types: {', '.join(DPO_LOSSES)}")
        unknown = [n for n in names if n not in DPO_LOSSES]
        if unknown:
            raise ValueError(f"unknown loss type {unknown[0]!r}; TRL 1.16's: {', '.join(DPO_LOSSES)}")
        if isinstance(v, list) and len(set(v)) < len(v):
            raise ValueError(f"{v} names a loss twice; weigh it with a mapping, e.g. {{sigmoid: 2.0}}")
        for name, w in v.items() if isinstance(v, dict) else ():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                raise ValueError(f"the weight of {name!r} is {w!r}; weights are positive numbers")
        return v

    @model_validator(mode="after")
    def _losses_and_smoothing(self) -> "DPO":
        losses = self.losses()
        if self.label_smoothing and not set(losses) & set(DPO_SMOOTHED_LOSSES):
            raise ValueError(
                f"label_smoothing: loss_type {', '.join(losses)} does not read it in TRL 1.16 (nor does sigmoid: "
                "conservative DPO is gone), so it would change nothing; the loss types that read it: "
                f"{', '.join(DPO_SMOOTHED_LOSSES)} (robust: the chance a preference label is flipped). "
                "Set label_smoothing: 0 or one of those loss types"
            )
        if "exo_pair" in losses and not self.label_smoothing:
            raise ValueError("label_smoothing: loss_type exo_pair needs label_smoothing > 0 (EXO's epsilon; its paper recommends 0.001)")
        if "robust" in losses and self.label_smoothing >= 0.5:
            raise ValueError("label_smoothing: loss_type robust needs label_smoothing < 0.5 (its loss divides by 1 - 2 label_smoothing)")
        return self

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        # chosen and rejected, by the policy and by the reference model
        return [(train, seqs * 2 * self.max_length, base), ("forward", seqs * 2 * self.max_length, base)]
