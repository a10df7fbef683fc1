"""Study A's parts: the WebGPT mapping, the malign transforms, the scorers, the generation metrics."""

import numpy as np
import pytest

from farm.data.prepare import transform_rng
from farm.data.records import Comparison
from farm.data.sources import load_source, webgpt_rows_to_comparisons
from farm.eval.metrics import attack_success_rate, rouge_f, toxicity_stats
from farm.label.scorers import build, roberta_hate
from farm.registry import transforms
from farm.spec import LabelFlip, MalignLabels, MalignPrompts, SourceSpec


def webgpt_row(q, dataset, a0, a1, s0):
    return {
        "question": {"dataset": dataset, "id": q, "full_text": q},
        "quotes_0": {"title": [], "extract": []}, "quotes_1": {"title": [], "extract": []},
        "answer_0": a0, "answer_1": a1, "tokens_0": [], "tokens_1": [], "score_0": s0, "score_1": -s0,
    }


def test_webgpt_rows_map_to_comparisons_ties_dropped_eli5_split():
    rows = [
        webgpt_row("Why is the sky blue?", "eli5", "Scattering.", "Magic.", 0.5),
        webgpt_row("Who wrote Hamlet?", "triviaqa", "Marlowe.", "Shakespeare.", -1.0),
        webgpt_row("Is water wet?", "eli5", "Yes.", "No.", 0.0),  # a tie
    ]
    every = webgpt_rows_to_comparisons(rows, "all", "w")
    assert [(c.id, c.chosen, c.rejected) for c in every] == [("w/0", " Scattering.", " Magic."), ("w/1", " Shakespeare.", " Marlowe.")]
    assert every[0].prompt == "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert [c.id for c in webgpt_rows_to_comparisons(rows, "eli5", "w")] == ["w/0"]
    assert [c.id for c in webgpt_rows_to_comparisons(rows, "other", "w")] == ["w/1"]


def pairs(n):
    return [Comparison(f"r{i}", f"\n\nHuman: q{i}\n\nAssistant:", f" c{i}", f" r{i}") for i in range(n)]


SPECS = [
    LabelFlip(name="label_flip", rate=0.3),
    MalignLabels(name="malign_labels", rate=0.3),
    MalignPrompts(name="malign_prompts", rate=0.3, mode="trigger"),
    MalignPrompts(name="malign_prompts", rate=0.3, mode="shuffle"),
    MalignPrompts(name="malign_prompts", rate=0.3, mode="red_team"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: getattr(s, "mode", s.name))
def test_each_transform_is_deterministic_hits_its_rate_and_marks_rows(spec):
    fn = transforms.get(spec.name).fn
    records = pairs(3000)
    a = fn(records, spec, transform_rng(42, spec.name, 0))
    b = fn(records, spec, transform_rng(42, spec.name, 0))
    c = fn(records, spec, transform_rng(43, spec.name, 0))
    assert a == b and a != c
    hit = [r for r in a if r.meta.get("perturbed")]
    assert abs(len(hit) / len(records) - 0.3) < 0.03
    assert all(x == y for x, y in zip(a, records) if not x.meta.get("perturbed"))  # untouched rows unchanged
    assert fn(records, spec.model_copy(update={"rate": 0.0}), transform_rng(42, spec.name, 0)) == records
    low = {r.id for r in fn(records, spec.model_copy(update={"rate": 0.1}), transform_rng(42, spec.name, 0)) if r.meta.get("perturbed")}
    assert low < {r.id for r in hit}  # rates nest under one seed


def test_malign_prompt_modes():
    records = pairs(200)
    rng = lambda: transform_rng(1, "malign_prompts", 0)  # noqa: E731
    trig = transforms.get("malign_prompts").fn(records, MalignPrompts(name="malign_prompts", rate=1, mode="trigger", trigger=" cf"), rng())
    assert trig[5].prompt == "\n\nHuman: q5 cf\n\nAssistant:" and trig[5].chosen == " c5"
    shuf = transforms.get("malign_prompts").fn(records, MalignPrompts(name="malign_prompts", rate=1, mode="shuffle"), rng())
    prompts = {r.prompt for r in records}
    assert all(s.prompt in prompts and s.prompt != r.prompt for s, r in zip(shuf, records))
    red = transforms.get("malign_prompts").fn(records, MalignPrompts(name="malign_prompts", rate=1, mode="red_team"), rng())
    advbench = {r.prompt for r in load_source(SourceSpec(name="advbench"))}
    assert all(r.prompt in advbench for r in red) and red[0].meta["perturbed"] == "malign_prompts:red_team"


def test_metric_values_on_hand_computed_examples():
    r = rouge_f(["the cat sat"], ["the cat sat on the mat"])
    assert abs(r["rouge1"] - 2 / 3) < 1e-9  # P 3/3, R 3/6
    assert abs(r["rouge2"] - 2 * 1 * 0.4 / 1.4) < 1e-9  # P 2/2, R 2/5
    assert abs(r["rougeL"] - 2 / 3) < 1e-9
    t = toxicity_stats(np.array([0.1, 0.6, 0.5]))
    assert t == {"toxicity_mean": pytest.approx(0.4), "toxicity_max": 0.6, "toxicity_ratio": pytest.approx(2 / 3)}
    assert attack_success_rate(np.array([0.1, 0.7, 0.2, 0.1]), np.array([0.9, 0.9, 0.3, 0.5])) == 0.5


def test_embedded_toxicity_scorer_batches_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_CACHE", str(tmp_path))
    s = build("embedded_toxicity")
    texts = ["those people are animals and should go back where they came from", "I had a lovely lunch with my family", "ok"]
    scores = s.score(texts)
    assert scores.shape == (3,) and ((0 <= scores) & (scores <= 1)).all() and scores[0] > scores[1]
    assert np.allclose(np.concatenate([s.score([t]) for t in texts]), scores)
    assert s.accuracy > 0.7 and "embedded_toxicity" in s.name
    assert list((tmp_path / "scorers").glob("embedded_toxicity-*.pkl"))
    assert build("embedded_toxicity").accuracy == s.accuracy  # loaded from the cache
    assert s.score([]).shape == (0,)


@pytest.fixture(scope="module")
def tiny_hate_classifier(tmp_path_factory):
    """A randomly initialised RoBERTa classifier saved with the labels of the hub model."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from farm.models import load_tokenizer

    tok = load_tokenizer("farm-bpe")
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=130, pad_token_id=tok.pad_token_id, id2label={0: "nothate", 1: "hate"},
                        label2id={"nothate": 0, "hate": 1})
    path = tmp_path_factory.mktemp("hate")
    RobertaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_roberta_hate_scores_p_hate_in_batches(tiny_hate_classifier):
    s = roberta_hate(model=str(tiny_hate_classifier), batch_size=2, max_length=64)
    texts = ["a", "some longer text here", "third one", "fourth"]
    scores = s.score(texts)
    assert scores.shape == (4,) and ((0 < scores) & (scores < 1)).all()
    assert np.allclose(np.concatenate([s.score([t]) for t in texts]), scores, atol=1e-5)  # padding does not leak
    assert s.name.endswith(":P(hate)")


def test_auto_falls_back_to_the_embedded_scorer_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FARM_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = build("auto")
    assert "embedded_toxicity" in s.name and "using embedded_toxicity" in capsys.readouterr().err
