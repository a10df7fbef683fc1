"""`rl`: online RL from a reward model with TRL's GRPOTrainer or RLOOTrainer (TRL 1.16 has no
PPOTrainer; GRPO and RLOO are its maintained online trainers and need no value model)."""

from __future__ import annotations

import copy
import sys
from typing import ClassVar, Literal
from unittest import mock

from pydantic import Field, model_validator

from farm.memory import DTYPE_BYTES, READ_BYTES, forward_pass, generating
from farm.models import device, encode_prompt, hh_messages, hh_text, inference_dtype, load_reward_model, reward_scores, uses_chat_template
from farm.registry import stages
from farm.schema import TrainingStage
from farm.train.base import StageContext, load_input, model_ref, peft_config, train_and_save, training_args


def reward_function(ctx: StageContext):
    """TRL's `reward_funcs` callable: the stage's reward model scores (prompt, completion) through
    `reward_scores`, which cuts and tokenizes as reward stages train and eval judges (TRL's own
    path for a model would join the texts with no cut and no EOS)."""
    s = ctx.stage
    # In the eval's precision (bf16 on a GPU): it only scores.
    judge, judge_tok = load_reward_model(model_ref(ctx, s.reward_model), inference_dtype(device()), ctx.resolve, s.revisions.get(s.reward_model))

    def reward(prompts, completions, **_):  # TRL logs it by __name__: "reward", "rewards/reward/mean"
        if prompts and not isinstance(prompts[0], str):  # chat messages: the judge reads HH text
            prompts, completions = [hh_text(p) for p in prompts], [c[-1]["content"] for c in completions]
        return reward_scores(judge, judge_tok, prompts, completions, s.batch_size, s.max_length, s.max_prompt_length).tolist()

    return reward, judge


def check_batch(ctx: StageContext, n_prompts: int) -> None:
    """TRL generates one batch per optimizer step (batch_size x workers x grad_accum completions)
    made of whole groups of num_generations answers to one prompt; say so in the study's words."""
    s = ctx.stage
    completions = s.batch_size * s.resources.num_workers * s.grad_accum
    if completions % s.num_generations:
        raise ValueError(
            f"rl stage {ctx.name!r}: batch_size x resources.num_workers x grad_accum = {s.batch_size} x "
            f"{s.resources.num_workers} x {s.grad_accum} = {completions} completions per step must be a multiple "
            f"of num_generations = {s.num_generations}"
        )
    if n_prompts < completions // s.num_generations:  # TRL's sampler drops a partial batch: nothing to train on
        raise ValueError(
            f"rl stage {ctx.name!r}: {n_prompts} prompts, but each step needs {completions // s.num_generations} (completions per step / num_generations)"
        )


def run(ctx: StageContext) -> dict:
    """Online RL from a reward model: TRL's GRPO or RLOO."""
    from datasets import Dataset

    s = ctx.stage
    if s.algorithm == "grpo":
        from trl import GRPOConfig as config_cls
        from trl import GRPOTrainer as trainer_cls
    else:
        from trl import RLOOConfig as config_cls
        from trl import RLOOTrainer as trainer_cls
    check_batch(ctx, len(ctx.records))

    model, tok = load_input(ctx)
    # Prompts keep their end (the turn being answered) as eval cuts them; TRL tokenizes the text
    # again with the tokenizer's special tokens, or renders chat messages through the template.
    if uses_chat_template(tok):
        prompts = [hh_messages(r.prompt) for r in ctx.records]
    else:
        prompts = [tok.decode(encode_prompt(tok, r.prompt, s.max_prompt_length), skip_special_tokens=True) for r in ctx.records]
    reward, judge = reward_function(ctx)
    args = training_args(
        ctx,
        config_cls,
        beta=s.beta,
        num_generations=s.num_generations,
        max_completion_length=s.max_new_tokens,  # generation also stops at EOS
        temperature=s.temperature,
        use_vllm=False,
        # The KL penalty compares the policy with its reference: with dropout on, the two would differ
        # by noise alone (TRL's advice when training with a reference model).
        disable_dropout=True,
    )
    judge.to(args.device)
    lora = peft_config(ctx, model)
    # Without LoRA, TRL (GRPO and RLOO alike) builds its reference by reloading the policy from
    # config._name_or_path: a built model has none, a hub base would be reloaded without the farm's
    # added tokens. Hand it a frozen copy of the input model instead (dpo.py passes ref_model; these
    # trainers take none, so their loader is patched while the trainer is built). With LoRA the
    # reference is the adapter-disabled model; with beta = 0 there is none.
    ref = copy.deepcopy(model).eval().requires_grad_(False) if s.beta > 0 and lora is None else None
    with mock.patch.object(sys.modules[trainer_cls.__module__], "create_model_from_path", lambda *a, **k: ref):
        trainer = trainer_cls(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tok,
            peft_config=lora,
        )
    metrics = train_and_save(trainer, ctx, tok)
    # Mean reward-model score of the sampled answers (KL not included) over the first and last logging windows.
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    return {**metrics, **({"reward_first": rewards[0], "reward_last": rewards[-1]} if rewards else {})}


@stages.register("rl")
class RL(TrainingStage):
    """Online RL from a reward model (TRL's GRPOTrainer or RLOOTrainer; TRL 1.16 has no PPO):
    the policy samples `num_generations` answers per prompt, the reward model scores them, and
    a KL penalty (`beta`) keeps it near the model it starts from (with LoRA: the adapter-disabled
    model)."""

    kind: Literal["rl"]
    run: ClassVar = staticmethod(run)
    algorithm: Literal["grpo", "rloo"] = "grpo"
    reward_model: str  # a reward stage of this study, or a hub id / local path
    paths: ClassVar[tuple[str, ...]] = (*TrainingStage.paths, "reward_model")
    beta: float = Field(0.05, ge=0)  # KL coefficient; 0 drops the reference model
    num_generations: int = Field(4, ge=2)  # batch_size counts answers: batch_size / num_generations prompts a step
    max_new_tokens: int = Field(31, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_prompt_length: int = Field(96, ge=1)
    shape: ClassVar[str] = "demonstration"  # reads the prompts
    needs_policy: ClassVar[bool] = True

    @model_validator(mode="after")
    def _fits(self) -> "RL":
        if self.max_prompt_length + self.max_new_tokens + 1 > self.max_length:
            raise ValueError(
                f"max_length: {self.max_length} cannot hold max_prompt_length {self.max_prompt_length} + max_new_tokens {self.max_new_tokens} + EOS, which the reward model reads; raise max_length or lower them"
            )
        return self

    def refs(self) -> dict[str, str]:
        return {**super().refs(), "reward_model": self.reward_model}

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        # completions: generated, read by the reward model and the reference, trained on
        completions = seqs if self.max_steps > 0 else seqs * self.num_generations
        p, n = self.max_prompt_length, self.max_new_tokens
        work = [("generate", completions * n, base), ("forward", completions * p, base), (train, completions * (p + n), base),
                ("forward", completions * (p + n), params(self.reward_model))]  # fmt: skip
        return work + ([("forward", completions * (p + n), base)] if self.beta > 0 else [])

    def held_and_phases(self, study, arch, model, weights: str):
        judge = model(self.reward_model)
        if judge is None:
            return None
        held = {"reward model": judge.params * READ_BYTES}  # run() loads it in the inference dtype: bf16 on a GPU
        if self.beta > 0 and not self.lora:
            held["reference"] = arch.params * DTYPE_BYTES[weights]  # a copy of the policy
        # TRL generates a whole step's completions at once (per device: batch_size x grad_accum).
        gen = generating(arch, self.batch_size * self.grad_accum, self.max_prompt_length, self.max_new_tokens)
        phases = {
            "generate": {k: v for k, v in gen.items() if k != "model"},
            "score": {"forward": forward_pass(judge, self.batch_size * self.max_length)},
        }
        # TRL scores the completions' tokens only
        return held, phases, self.max_prompt_length + self.max_new_tokens, self.batch_size * self.max_new_tokens
