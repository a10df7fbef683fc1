"""Study E's Constitutional AI data (after Bai et al. 2022): `critique_revision` has a model
critique and revise its own answers against sampled principles (SL-CAI data), and `ai_feedback`
has a feedback model choose between two sampled answers (RL-CAI soft preference labels)."""

from __future__ import annotations

import sys
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from farm.data.constitution import (
    OPTIONS,
    Round,
    critique_prompt,
    draw_principles,
    end_of_turn,
    feedback_prompt,
    fit_context,
    load_constitution,
    revision_prompt,
    soft_label,
)
from farm.data.records import RECORDS_FILE, Comparison, write_records
from farm.memory import READ_BYTES, Memory, forward_pass, generating_as
from farm.models import device, encode_prompt, generate
from farm.registry import stages
from farm.schema import GenerationSpec, StageSpec, check_constitution, constitution_digest
from farm.train.base import StageContext, inference_model, load_input


def critique_revision(ctx: StageContext) -> dict:
    """Builds SL-CAI data: answers critiqued and revised against the constitution's principles."""
    s = ctx.stage
    constitution = load_constitution(s.constitution)
    examples = constitution.examples[: s.few_shot]
    model, tok = load_input(ctx)
    ask = _asker(model.to(device()), tok, s)
    prompts = [r.prompt for r in ctx.records]
    first = ask(prompts)
    room = s.max_prompt_length - s.generation.max_new_tokens

    def fits(text: str) -> bool:  # with room for the longest critique, which the revision prompt will hold
        return len(encode_prompt(tok, text, sys.maxsize)) <= room

    final, rounds, counts = revise(ask, ctx.records, first, constitution, examples, s.rounds, ctx.seed, s.transcript, fits)
    out = [
        Comparison(r.id, r.prompt, chosen=f, rejected=a, label=1.0, meta={"answer": a, "rounds": rs})
        for r, a, f, rs in zip(ctx.records, first, final, rounds)
    ]
    _write(ctx, out)
    return {
        "rows": len(out),
        "rounds": s.rounds,
        "answer_words": _mean_words(first),
        "revision_words": _mean_words(final),
        "unchanged": sum(f == a for f, a in zip(final, first)) / max(1, len(out)),
        **counts,
    }


def revise(ask, records, first: list[str], constitution, examples, rounds: int, seed: int, transcript: bool = False, fits=lambda text: True):
    """`rounds` rounds of batched critiques, then batched revisions. Each round critiques the
    conversation with its latest answer (Bai et al. §3.1), or with `transcript` the first answer
    followed by every earlier round with a non-empty revision (requests, critique, revision).
    Contexts that do not `fits` are shortened by `fit_context`. An empty revision keeps the answer
    before it. Returns (final answers, per row the rounds as {principle, critique, revision},
    counts: empty revisions, and rounds whose context lost earlier rounds or worked examples)."""
    prompts = [r.prompt for r in records]
    draws = [draw_principles(r.id, seed, rounds, len(constitution.principles)) for r in records]
    current, history, shown = list(first), [[] for _ in records], [[] for _ in records]
    counts = {"empty_revisions": 0, "context_shortened": 0}
    for k in range(rounds):
        principles = [constitution.principles[d[k]] for d in draws]
        contexts = []
        for p, answer, earlier, pr in zip(prompts, first if transcript else current, shown if transcript else [()] * len(records), principles):
            contexts.append(fit_context(p, answer, tuple(earlier), pr, examples, fits))
            counts["context_shortened"] += contexts[-1][1:] != (tuple(earlier), tuple(examples))
        critiques = ask([critique_prompt(p, a, pr, ex, e) for p, (a, e, ex), pr in zip(prompts, contexts, principles)])
        revisions = ask([revision_prompt(p, a, c, pr, ex, e) for p, (a, e, ex), c, pr in zip(prompts, contexts, critiques, principles)])
        for i, (pr, c, rv) in enumerate(zip(principles, critiques, revisions)):
            history[i].append({"principle": pr.name, "critique": c, "revision": rv})
            if rv:
                current[i] = rv
                shown[i].append(Round(pr, c, rv))
            else:
                counts["empty_revisions"] += 1
    return current, history, counts


def ai_feedback(ctx: StageContext) -> dict:
    """Builds RLAIF preference labels: the feedback model picks between two sampled answers by a principle."""
    s = ctx.stage
    principles = load_constitution(s.constitution).principles
    prompts = [r.prompt for r in ctx.records]
    policy, tok = load_input(ctx)
    # The prompt list twice, as rank does: with do_sample the two copies draw different answers.
    samples = generate(policy.to(device()), tok, prompts * 2, s.generation, s.max_prompt_length, ctx.seed)
    del policy  # the feedback model takes its place in memory
    a, b = samples[: len(prompts)], samples[len(prompts) :]
    chosen = [principles[draw_principles(r.id, ctx.seed, 1, len(principles))[0]] for r in ctx.records]
    judge, judge_tok = inference_model(ctx, s.feedback_model)
    texts = [feedback_prompt(p, pr, x, y) for p, pr, x, y in zip(prompts, chosen, a, b)]
    logp = option_logprobs(judge, judge_tok, texts, s.batch_size, s.max_length)
    labels = [soft_label(la, lb, s.clamp) for la, lb in logp]
    out = [
        Comparison(r.id, r.prompt, chosen=x, rejected=y, label=p, meta={"principle": pr.name, "logprobs": list(lp)})
        for r, x, y, p, pr, lp in zip(ctx.records, a, b, labels, chosen, logp)
    ]
    _write(ctx, out)
    n = max(1, len(labels))
    return {
        "rows": len(out),
        "p_a_mean": sum(labels) / n,
        "a_preferred": sum(p > 0.5 for p in labels) / n,
        "label_margin": sum(abs(p - 0.5) for p in labels) / n,
        "identical_samples": sum(x == y for x, y in zip(a, b)) / n,
    }


def option_logprobs(model, tok, prompts: list[str], batch_size: int, max_length: int) -> list[tuple[float, float]]:
    """(log P(" (A)"), log P(" (B)")) after each feedback prompt: the summed log-probs of each
    option's tokens, in right-padded batches. The prompt keeps its end (the question, options
    and cue), cut to leave room for the option within `max_length`."""
    import torch

    options = [tok(o, add_special_tokens=False)["input_ids"] for o in OPTIONS]
    # The prompt as the model reads every prompt (its special tokens, or its chat template).
    rows = [(encode_prompt(tok, p, max_length - len(o)), o) for p in prompts for o in options]
    sums = []
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(p) + len(o) for p, o in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, o) in enumerate(batch):
            ids[i, : len(p) + len(o)] = torch.tensor(p + o)
            mask[i, : len(p) + len(o)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(logits.device)).squeeze(-1).cpu()
        # token t of the option sits at position len(p) + t, predicted from position len(p) + t - 1
        sums += [logp[i, len(p) - 1 : len(p) - 1 + len(o)].sum().item() for i, (p, o) in enumerate(batch)]
    return list(zip(sums[0::2], sums[1::2]))


def _asker(model, tok, s):
    """Batched generation for one stage, each output cut at the next tag of the CAI format."""
    return lambda prompts: [end_of_turn(t) for t in generate(model, tok, prompts, s.generation, s.max_prompt_length)]


def _mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(1, len(texts))


def _write(ctx: StageContext, records: list) -> None:
    if ctx.output_dir is not None:  # rank 0 writes
        write_records(ctx.output_dir / RECORDS_FILE, records)


@stages.register("critique_revision")
class CritiqueRevision(StageSpec):
    """Study E, SL-CAI data: the model answers each prompt, then for `rounds` rounds critiques
    its answer against a principle drawn (seeded) from the constitution and revises it. Builds
    comparisons (the final revision preferred over the first answer; every text in `meta`)."""

    kind: Literal["critique_revision"]
    run: ClassVar = staticmethod(critique_revision)
    constitution: str = "default"  # a bundled constitution, or a YAML file of principles
    paths: ClassVar[tuple[str, ...]] = ("constitution",)
    rounds: int = Field(1, ge=1, le=4)
    # False: each round critiques the conversation with its latest revision as the answer, as Bai
    # et al. §3.1 describe ("the final prompt-revision pair is formatted in the same manner as the
    # original prompt-response pair"). True: each round's prompt also holds the first answer and
    # every earlier round's requests, critique and revision (the growing transcript).
    transcript: bool = False
    few_shot: int = Field(1, ge=0)  # worked examples of the constitution shown before each conversation
    generation: GenerationSpec = Field(default_factory=lambda: GenerationSpec(max_new_tokens=64, batch_size=32))
    # Tokens of context each generation sees: a GPT-2 revision prompt with one worked example is
    # ~350 tokens. A longer one drops the earlier rounds, then worked examples, whole (see
    # `fit_context`), leaving room for `generation.max_new_tokens`.
    max_prompt_length: int = Field(512, ge=1)
    shape: ClassVar[str] = "demonstration"  # reads the prompts
    builds: ClassVar[str | None] = "comparison"
    version: ClassVar[int] = 2
    produces: ClassVar[str] = "records"
    trains: ClassVar[bool] = False
    needs_policy: ClassVar[bool] = True

    _constitution = field_validator("constitution")(classmethod(lambda cls, v: check_constitution(v)))

    @model_validator(mode="after")
    def _enough_examples(self) -> "CritiqueRevision":
        have = len(load_constitution(self.constitution).examples)
        if self.few_shot > have:
            raise ValueError(f"few_shot: {self.few_shot} worked examples asked, the constitution {self.constitution!r} has {have}")
        return self

    def key_extra(self) -> dict:
        return {**super().key_extra(), "constitution": constitution_digest(self.constitution)}

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        asks = seqs * (1 + 2 * self.rounds)  # the first answer, then a critique and a revision a round
        return [("generate", asks * self.generation.max_new_tokens, base), ("forward", asks * self.max_prompt_length, base)]

    def memory(self, study, arch, model, where) -> Memory | None:
        return Memory({}, {"generate": generating_as(arch, self.generation, self.max_prompt_length)}, **where) if arch else None


@stages.register("ai_feedback")
class AIFeedback(StageSpec):
    """Study E, RLAIF labels: the policy samples two answers per prompt; the feedback model reads
    the conversation, a principle's question and the options (A) and (B), and the soft label is
    p_A = softmax of its log-probs of "(A)" and "(B)", optionally clamped."""

    kind: Literal["ai_feedback"]
    run: ClassVar = staticmethod(ai_feedback)
    feedback_model: str  # a model stage of this study, or a hub id / local path
    constitution: str = "default"
    paths: ClassVar[tuple[str, ...]] = ("feedback_model", "constitution")
    generation: GenerationSpec = Field(default_factory=lambda: GenerationSpec(do_sample=True, top_p=0.95, top_k=0, max_new_tokens=64, batch_size=32))
    clamp: tuple[float, float] | None = None  # e.g. [0.4, 0.6] for chain-of-thought labels
    batch_size: int = Field(16, ge=1)  # feedback-model scoring
    max_length: int = Field(256, ge=8)  # tokens of the feedback prompt (it keeps its end)
    max_prompt_length: int = Field(96, ge=1)  # tokens of the conversation the policy answers
    shape: ClassVar[str] = "demonstration"
    builds: ClassVar[str | None] = "comparison"
    produces: ClassVar[str] = "records"
    trains: ClassVar[bool] = False
    needs_policy: ClassVar[bool] = True

    _constitution = field_validator("constitution")(classmethod(lambda cls, v: check_constitution(v)))

    def key_extra(self) -> dict:
        return {**super().key_extra(), "constitution": constitution_digest(self.constitution)}

    @field_validator("clamp")
    @classmethod
    def _range(cls, v):
        if v is not None and not 0 <= v[0] <= 0.5 <= v[1] <= 1:
            raise ValueError("clamp: [low, high] with 0 <= low <= 0.5 <= high <= 1, e.g. [0.4, 0.6]")
        return v

    def refs(self) -> dict[str, str]:
        return {**super().refs(), "feedback_model": self.feedback_model}

    def work(self, seqs: float, train: str, base: float | None, params, study) -> list | None:
        answers = seqs * 2  # two answers a prompt, then the feedback model reads both options
        return [("generate", answers * self.generation.max_new_tokens, base), ("forward", answers * self.max_prompt_length, base),
                ("forward", answers * self.max_length, params(self.feedback_model))]  # fmt: skip

    def memory(self, study, arch, model, where) -> Memory | None:
        judge = model(self.feedback_model)
        if arch is None or judge is None:
            return None
        tokens = self.batch_size * self.max_length  # every token's log-probabilities (option_logprobs)
        score = {"feedback model": judge.params * READ_BYTES, "forward": forward_pass(judge, tokens, tokens)}
        return Memory({}, {"generate": generating_as(arch, self.generation, self.max_prompt_length), "score": score}, **where)
