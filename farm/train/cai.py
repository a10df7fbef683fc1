"""Study E's Constitutional AI data (after Bai et al. 2022): `critique_revision` has a model
critique and revise its own answers against sampled principles (SL-CAI data), and `ai_feedback`
has a feedback model choose between two sampled answers (RL-CAI soft preference labels)."""

from __future__ import annotations

import sys

from farm.data.records import Comparison
from farm.models import device, encode_prompt, generate
from farm.registry import stages
from farm.train.base import StageContext, inference_model, load_input


@stages.register("critique_revision")
def critique_revision(ctx: StageContext) -> dict:
    """Builds SL-CAI data: answers critiqued and revised against the constitution's principles."""
    from farm.data.constitution import load_constitution

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
    from farm.data.constitution import Round, critique_prompt, draw_principles, fit_context, revision_prompt

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


@stages.register("ai_feedback")
def ai_feedback(ctx: StageContext) -> dict:
    """Builds RLAIF preference labels: the feedback model picks between two sampled answers by a principle."""
    from farm.data.constitution import draw_principles, feedback_prompt, load_constitution, soft_label

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

    from farm.data.constitution import OPTIONS

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
    from farm.data.constitution import end_of_turn

    return lambda prompts: [end_of_turn(t) for t in generate(model, tok, prompts, s.generation, s.max_prompt_length)]


def _mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(1, len(texts))


def _write(ctx: StageContext, records: list) -> None:
    from farm.data.records import write_records
    from farm.train.runner import RECORDS_FILE

    if ctx.output_dir is not None:  # rank 0 writes
        write_records(ctx.output_dir / RECORDS_FILE, records)
