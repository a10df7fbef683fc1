"""Prompt diversity of a training set (Study D): how much of the prompts' token bigrams are
distinct, scaled by the square root of the number of prompts."""

from __future__ import annotations

import math

from farm import hub
from farm.config import BUNDLED_TOKENIZERS, looks_like_path
from farm.models import load_tokenizer


def prompt_diversity(token_id_lists: list[list[int]]) -> float:
    """D = sqrt(N) * U2 / T2 (Song et al. 2024, "Scaling Data Diversity for Fine-Tuning
    Language Models in Human Alignment"): N prompts, U2 distinct token bigrams over all
    prompts, T2 bigrams in all (a prompt of m tokens has m - 1). The paper reports D ~ 12.7
    at 1,500 prompts and ~ 20.8 at 36,000."""
    distinct: set[tuple[int, int]] = set()
    total = 0
    for ids in token_id_lists:
        bigrams = list(zip(ids, ids[1:]))
        distinct.update(bigrams)
        total += len(bigrams)
    if total == 0:
        raise ValueError(f"prompt diversity is undefined: the {len(token_id_lists)} prompts have no token bigrams (each is under two tokens)")
    return math.sqrt(len(token_id_lists)) * len(distinct) / total


def prompt_diversity_of(tok, prompts: list[str]) -> float:
    """prompt_diversity of the prompts' token ids under `tok`, as ScalingAlignment counts them
    (`data_preprocess/diversity.py`: `tokenizer.encode(prompt, truncation=True, max_length=512)`):
    with the tokenizer's special tokens (LLaMA's BOS: one more bigram per prompt; GPT-2 adds
    none) and at most 512 tokens per prompt."""
    # A fast tokenizer fails on an empty batch; let prompt_diversity say why it is undefined.
    return prompt_diversity(tok(prompts, truncation=True, max_length=512)["input_ids"] if prompts else [])


# A tokenizer's files in a hub repository (a tokenizer-only one, as the LLaMA tokenizer's, has no config.json).
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model"]


def counting_tokenizer(name: str, revision: str | None = None):
    """The tokenizer a stage counts prompt diversity with: bundled, a local folder, or a hub
    repository read as a local folder of its tokenizer files. transformers looks for a config.json
    beside a tokenizer, which a tokenizer-only repository lacks; online the hub answers that it is
    absent, but an offline cache (HF_HUB_OFFLINE) cannot tell, and the load fails."""
    if name in BUNDLED_TOKENIZERS or looks_like_path(name):
        return load_tokenizer(name)

    return load_tokenizer(str(hub.snapshot(name, "model", revision, patterns=TOKENIZER_FILES)))
