"""Held-out metrics, registered by name. Each takes the evaluated model, the model it was
trained from (the reference) and the eval records, and returns named values."""

from __future__ import annotations

import dataclasses
import math

from farm.registry import metrics


@dataclasses.dataclass(frozen=True)
class Metric:
    fn: object
    shape: str  # the record shape it reads


def register(name: str, shape: str):
    def add(fn):
        metrics.register(name)(Metric(fn, shape))
        return fn

    return add


def encode_pair(tok, prompt: str, response: str, max_length: int, max_prompt_length: int) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, response) that fit `max_length`: the prompt keeps its end (the
    turn being answered), the response keeps its start. Training and eval cut the same way."""
    p = tok(prompt, add_special_tokens=False)["input_ids"][-max_prompt_length:]
    r = tok(response, add_special_tokens=False)["input_ids"][: max(1, max_length - len(p))]
    return p, r


def response_logprobs(model, tok, pairs, spec) -> tuple[list[float], list[int]]:
    """Summed log-prob of each response given its prompt, and its token count."""
    import torch

    model.eval()
    sums, counts = [], []
    for start in range(0, len(pairs), spec.batch_size):
        batch = [encode_pair(tok, p, r, spec.max_length, spec.max_prompt_length) for p, r in pairs[start : start + spec.batch_size]]
        width = max(len(p) + len(r) for p, r in batch)
        pad = tok.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        target = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, (p, r) in enumerate(batch):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            mask[i, :n] = 1
            target[i, len(p) : n] = True
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        logp = logp * target[:, 1:]
        sums += logp.sum(-1).tolist()
        counts += target[:, 1:].sum(-1).tolist()
    return sums, counts


def _wins(a: list[float], b: list[float]) -> float:
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


@register("preference_accuracy", shape="comparison")
def preference_accuracy(model, ref, tok, records, spec) -> dict:
    """Share of pairs whose chosen answer has the higher log-likelihood under the model; and
    under the DPO implicit reward log pi(y|x) - log pi_ref(y|x), the reference being the
    model the last stage started from."""
    chosen = response_logprobs(model, tok, [(r.prompt, r.chosen) for r in records], spec)[0]
    rejected = response_logprobs(model, tok, [(r.prompt, r.rejected) for r in records], spec)[0]
    ref_c = response_logprobs(ref, tok, [(r.prompt, r.chosen) for r in records], spec)[0]
    ref_r = response_logprobs(ref, tok, [(r.prompt, r.rejected) for r in records], spec)[0]
    margin_c = [c - rc for c, rc in zip(chosen, ref_c)]
    margin_r = [r - rr for r, rr in zip(rejected, ref_r)]
    return {
        "preference_accuracy": _wins(chosen, rejected),
        "reward_accuracy": _wins(margin_c, margin_r),
        "reward_margin": sum(c - r for c, r in zip(margin_c, margin_r)) / len(records),
        "eval_pairs": len(records),
    }


@register("perplexity", shape="demonstration")
def perplexity(model, ref, tok, records, spec) -> dict:
    """exp(mean token NLL) of the (preferred) responses given their prompts."""
    sums, counts = response_logprobs(model, tok, [(r.prompt, r.response) for r in records], spec)
    return {"perplexity": math.exp(-sum(sums) / max(1, sum(counts)))}
