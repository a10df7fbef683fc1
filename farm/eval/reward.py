"""Reward-model scores of answers, and the `reward_score` metric (Study D): greedy answers to
held-out prompts, judged by a held-out reward model as sigmoid(reward) x 100, and BLEU
against the best reference answer."""

from __future__ import annotations

import numpy as np

from farm.eval.metrics import answer, register
from farm.models import reward_scores


@register("reward_score", shape="comparison")
def reward_score(model, ref, tok, records, spec) -> dict:
    """Greedy answers (spec.generation, cut at the next turn), scored by the judge
    `spec.reward_model`: mean sigmoid(reward) x 100, the mean raw reward, and corpus BLEU
    (sacrebleu) against each prompt's best answer (a comparison's chosen one)."""
    import sacrebleu

    from farm.models import for_inference

    records, prompts, answers = answer(model, tok, records, spec)
    judge, judge_tok = for_inference(spec.reward_model, reward=True)
    rewards = reward_scores(judge, judge_tok, prompts, answers, spec.batch_size, spec.max_length, spec.max_prompt_length)
    return {
        "reward": float(np.mean(100 / (1 + np.exp(-rewards)))),
        "reward_logit": float(rewards.mean()),
        "bleu": float(sacrebleu.corpus_bleu(answers, [[r.chosen for r in records]]).score),
        "generated": len(answers),
        "mean_words": float(np.mean([len(a.split()) for a in answers])),
    }
