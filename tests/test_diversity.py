"""Prompt diversity D = sqrt(N) * U2 / T2 on hand-computed inputs and through a tokenizer."""

import math

import pytest

from farm.train.diversity import prompt_diversity, prompt_diversity_of


def test_hand_computed_value():
    # Bigrams (1,2), (2,3), (1,2), (2,4): U2 = 3 distinct of T2 = 4; N = 2.
    assert prompt_diversity([[1, 2, 3], [1, 2, 4]]) == pytest.approx(math.sqrt(2) * 3 / 4)


def test_prompts_without_bigrams_count_in_n_only():
    # [7] has no bigram; [1, 2, 1, 2] has (1,2), (2,1), (1,2): U2 = 2, T2 = 3; N = 2.
    assert prompt_diversity([[7], [1, 2, 1, 2]]) == pytest.approx(math.sqrt(2) * 2 / 3)


def test_duplicates_lower_diversity():
    distinct = [[1, 2, 3], [4, 5, 6]]
    assert prompt_diversity(distinct) == pytest.approx(math.sqrt(2))
    assert prompt_diversity([[1, 2, 3], [1, 2, 3]]) == pytest.approx(math.sqrt(2) / 2)
    assert prompt_diversity([*distinct, [1, 2, 3]]) < prompt_diversity([*distinct, [7, 8, 9]]) == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("prompts", [[], [[1], [2], []]])
def test_no_bigrams_is_an_error(prompts):
    with pytest.raises(ValueError, match="no token bigrams"):
        prompt_diversity(prompts)


def test_through_the_bundled_tokenizer():
    from farm.models import load_tokenizer

    tok = load_tokenizer("farm-bpe")
    prompts = ["How do I bake bread?", "How do I bake a cake?", "What is the capital of France?"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert prompt_diversity_of(tok, prompts) == pytest.approx(prompt_diversity(ids))
    assert prompt_diversity_of(tok, prompts[:1] * 3) < prompt_diversity_of(tok, prompts)
    with pytest.raises(ValueError, match="no token bigrams"):
        prompt_diversity_of(tok, [])


def test_counted_with_llamas_tokenizer_from_a_tokenizer_only_repository_offline(mirror):
    """Study D's paper profile counts with LLaMA's tokenizer, from a repository of tokenizer files only
    (no config.json, which an offline cache cannot tell is absent): BOS comes first, as the reference
    encodes, so each prompt has one more bigram than its text alone."""
    from hub_mirror.models import LLAMA_TOKENIZER

    from farm.train.diversity import counting_tokenizer

    tok = counting_tokenizer(LLAMA_TOKENIZER)
    prompts = ["How do I bake bread?", "How do I bake a cake?"]
    ids = tok(prompts)["input_ids"]
    assert all(row[0] == tok.bos_token_id for row in ids)
    assert prompt_diversity_of(tok, prompts) == pytest.approx(prompt_diversity(ids))
    assert prompt_diversity(ids) != pytest.approx(prompt_diversity(tok(prompts, add_special_tokens=False)["input_ids"]))
