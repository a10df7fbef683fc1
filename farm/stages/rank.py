"""`rank`: Study D's ranking data. Every training prompt's comparison gives two candidates, a
generator samples `samples` more, a reward model scores them all, and each prompt becomes a
Ranking sorted best first. It trains nothing, so it runs as one Ray task, not under Ray Train."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from farm.data.records import RECORDS_FILE, Ranking, write_records
from farm.memory import READ_BYTES, Memory, forward_pass, generating_as
from farm.models import generate, reward_scores
from farm.registry import stages
from farm.schema import GenerationSpec, StageSpec
from farm.train.base import StageContext, inference_model


def run(ctx: StageContext) -> dict:
    """Builds rankings: sampled answers beside each comparison's two, ordered by a reward model."""
    s = ctx.stage
    records = ctx.records
    prompts = [r.prompt for r in records]
    generator, tok = inference_model(ctx, s.generator)
    samples = generate(generator, tok, prompts * s.samples, s.generation, s.max_prompt_length, ctx.seed) if s.samples else []
    del generator  # the reward model takes its place in memory
    candidates = [[r.chosen, r.rejected, *samples[j :: len(records)]] for j, r in enumerate(records)]
    origins = ["chosen", "rejected", *["sample"] * s.samples]
    judge, judge_tok = inference_model(ctx, s.reward_model, reward=True)
    flat = reward_scores(
        judge,
        judge_tok,
        [p for p, c in zip(prompts, candidates) for _ in c],
        [a for c in candidates for a in c],
        s.batch_size,
        s.max_length,
        s.max_prompt_length,
    ).reshape(len(records), -1)
    rankings = []
    for r, answers, rewards in zip(records, candidates, flat):
        order = sorted(range(len(answers)), key=lambda i: -rewards[i])  # stable: ties keep the data's order
        rankings.append(
            Ranking(
                r.id,
                r.prompt,
                tuple(answers[i] for i in order),
                tuple(float(rewards[i]) for i in order),
                meta={"origins": [origins[i] for i in order]},
            )
        )
    if ctx.output_dir is not None:  # rank 0 writes
        write_records(ctx.output_dir / RECORDS_FILE, rankings)
    top = [rk.meta["origins"][0] for rk in rankings]
    return {
        "rankings": len(rankings),
        "ranking_length": len(origins),
        "chosen_ranked_first": top.count("chosen") / len(top),
        "sample_ranked_first": top.count("sample") / len(top),
        "chosen_above_rejected": float((flat[:, 0] > flat[:, 1]).mean()),
    }


@stages.register("rank")
class Rank(StageSpec):
    """Study D: ranking data. Each prompt's candidates are its comparison's two answers plus
    `samples` answers sampled from `generator`, all scored by `reward_model` and sorted best
    first: rankings of length 2 + samples."""

    kind: Literal["rank"]
    run: ClassVar = staticmethod(run)
    generator: str  # a model stage of this study, or a hub id / local path
    reward_model: str  # a reward stage of this study, or a hub id / local path
    paths: ClassVar[tuple[str, ...]] = ("generator", "reward_model")
    samples: int = Field(2, ge=0)
    generation: GenerationSpec = Field(default_factory=lambda: GenerationSpec(do_sample=True, top_p=0.9, top_k=0, max_new_tokens=48))
    batch_size: int = Field(32, ge=1)  # reward-model scoring
    max_length: int = Field(128, ge=8)
    max_prompt_length: int = Field(96, ge=1)
    shape: ClassVar[str] = "comparison"
    builds: ClassVar[str | None] = "ranking"
    produces: ClassVar[str] = "records"
    trains: ClassVar[bool] = False

    @model_validator(mode="after")
    def _no_input(self) -> "Rank":
        if self.input is not None:
            raise ValueError("input: a rank stage starts from no model; generator and reward_model name the models it reads")
        return self

    def refs(self) -> dict[str, str]:
        return {**super().refs(), "generator": self.generator, "reward_model": self.reward_model}

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        # `samples` answers a prompt, then every candidate scored
        answers, g = seqs * self.samples, self.generation
        return [("generate", answers * g.max_new_tokens, params(self.generator)), ("forward", answers * self.max_prompt_length, params(self.generator)),
                ("forward", seqs * (2 + self.samples) * self.max_length, params(self.reward_model))]  # fmt: skip

    def memory(self, study, arch, model, where) -> Memory | None:
        gen, judge = model(self.generator), model(self.reward_model)
        if gen is None or judge is None:
            return None
        score = {"reward model": judge.params * READ_BYTES, "forward": forward_pass(judge, self.batch_size * self.max_length)}
        phases = {"generate": generating_as(gen, self.generation, self.max_prompt_length), "score": score} if self.samples else {"score": score}
        return Memory({}, phases, **where)  # the generator is freed before the reward model loads
