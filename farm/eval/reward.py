"""Reward-model scores of answers, and the `reward_score` metric (Study D): greedy answers to
held-out prompts, judged by a held-out reward model as sigmoid(reward) x 100, and BLEU
against the best reference answer."""

from __future__ import annotations

import warnings

import numpy as np

from farm.eval.metrics import answer, items, register
from farm.models import for_inference, reward_scores


@register(
    "reward_score",
    shape="comparison",
    higher_is_better={"reward": True, "reward_logit": True, "bleu": True, "sacrebleu": True, "generated": None, "mean_words": None},
)
def reward_score(model, ref, tok, records, spec) -> dict:
    """Greedy answers (spec.generation, cut where `generation.stop` says), scored by the judge
    `spec.reward_model`: mean sigmoid(reward) x 100, the mean raw reward, and BLEU against each
    prompt's best answer (a comparison's chosen one) two ways: `bleu`, as ScalingAlignment computes
    it (`eval_hh/metrics.py`: the mean of NLTK's `sentence_bleu([ref], hyp)` over stripped strings,
    on 0-1 — NLTK reads a string as a sequence of characters, so this is a character 4-gram BLEU,
    unsmoothed), and `sacrebleu`, the standard corpus BLEU on words (0-100)."""
    import sacrebleu

    records, prompts, answers = answer(model, tok, records, spec)
    judge, judge_tok = for_inference(spec.reward_model, reward=True, revision=spec.revisions.get(spec.reward_model))
    rewards = reward_scores(judge, judge_tok, prompts, answers, spec.batch_size, spec.max_length, spec.max_prompt_length)
    per = {"reward": 100 / (1 + np.exp(-rewards)), "reward_logit": rewards, "bleu": reference_bleu(answers, [r.chosen for r in records])}
    return {
        **{k: float(v.mean()) for k, v in per.items()},
        "sacrebleu": float(sacrebleu.corpus_bleu(answers, [[r.chosen for r in records]]).score),
        "generated": len(answers),
        "mean_words": float(np.mean([len(a.split()) for a in answers])),
        **items(records, **per),
    }


def reference_bleu(answers: list[str], references: list[str]) -> np.ndarray:
    """ScalingAlignment's BLEU per answer (`eval_hh/metrics.py` `get_bleu`, whose score is their
    mean): NLTK's `sentence_bleu([reference], answer)` on the stripped strings. NLTK reads a string
    as a sequence of characters, so this is an unsmoothed character 4-gram BLEU on 0-1, kept as the
    authors ran it."""
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():  # NLTK warns of every answer without a matching 4-gram (BLEU 0)
        warnings.simplefilter("ignore")
        return np.array([sentence_bleu([r.strip()], a.strip()) for a, r in zip(answers, references)])
