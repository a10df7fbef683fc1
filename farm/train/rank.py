"""`rank`: Study D's ranking data. Every training prompt's comparison gives two candidates, a
generator samples `samples` more, a reward model scores them all, and each prompt becomes a
Ranking sorted best first. It trains nothing, so it runs as one Ray task, not under Ray Train."""

from __future__ import annotations

from farm.data.records import Ranking
from farm.registry import stages
from farm.train.base import StageContext, inference_model


@stages.register("rank")
def run(ctx: StageContext) -> dict:
    """Builds rankings: sampled answers beside each comparison's two, ordered by a reward model."""
    from farm.data.records import write_records
    from farm.models import generate, reward_scores
    from farm.train.runner import RECORDS_FILE

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
