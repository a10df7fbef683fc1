"""Reward-model scores of answers, and the `reward_score` metric (Study D): greedy answers to
held-out prompts, judged by a held-out reward model as sigmoid(reward) x 100, and BLEU
against the best reference answer."""

from __future__ import annotations

import numpy as np

from farm.eval.metrics import answer, encode_pair, register


def reward_scores(model, tok, prompts: list[str], responses: list[str], batch_size: int, max_length: int, max_prompt_length: int) -> np.ndarray:
    """The reward model's scalar for each (prompt, response), in batches, each text tokenized by
    the reward model's own tokenizer. A decoder (a `reward` stage's GPT-2) reads prompt + response
    + EOS cut as training cuts them (the prompt keeps its end); an encoder with a separator token
    (OpenAssistant's DeBERTa reward model) reads the pair as its tokenizer encodes pairs."""
    import torch

    pairs_encoder = tok.sep_token is not None
    if pairs_encoder:
        tok.truncation_side = "left"  # the prompt keeps the turn being answered
    out = []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], responses[start : start + batch_size]
        if pairs_encoder:
            enc = tok(ps, rs, truncation="only_first", max_length=max_length, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            rows = [p + r + [tok.eos_token_id] for p, r in (encode_pair(tok, p, r, max_length - 1, max_prompt_length) for p, r in zip(ps, rs))]
            width = max(map(len, rows))
            # Right padding: a decoder's classifier reads the last token before the first pad.
            ids = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in rows])
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        with torch.no_grad():
            out += model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, 0].float().tolist()
    return np.array(out)


@register("reward_score", shape="comparison")
def reward_score(model, ref, tok, records, spec) -> dict:
    """Greedy answers (spec.generation, cut at the next turn), scored by the judge
    `spec.reward_model`: mean sigmoid(reward) x 100, the mean raw reward, and corpus BLEU
    (sacrebleu) against each prompt's best answer (a comparison's chosen one)."""
    import sacrebleu

    from farm.models import load_reward_model

    records, prompts, answers = answer(model, tok, records, spec)
    judge, judge_tok = load_reward_model(spec.reward_model)
    rewards = reward_scores(judge, judge_tok, prompts, answers, spec.batch_size, spec.max_length, spec.max_prompt_length)
    return {
        "reward": float(np.mean(100 / (1 + np.exp(-rewards)))),
        "reward_logit": float(rewards.mean()),
        "bleu": float(sacrebleu.corpus_bleu(answers, [[r.chosen for r in records]]).score),
        "generated": len(answers),
        "mean_words": float(np.mean([len(a.split()) for a in answers])),
    }
