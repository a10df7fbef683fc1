"""Study C: sentence sources and cleaning, control-token tagging, the misalignment arithmetic,
and a whole run of the conditional-training study with its labelling stage."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, farm

from farm.data.records import Text
from farm.data.sources import SourceSpec, clean_sentence, load_source
from farm.data.transforms import control_tags, control_tokens
from farm.eval.misalignment import misalignment, negative, prompt_records, scored_texts, splitter
from farm.models import load_artifact, load_tokenizer
from farm.schema import ControlTokens
from farm.spec import ConditionalSpec
from farm.stages.pretrain import Pretrain, collator, rows, sequences

BOTH = ControlTokens(name="control_tokens", toxicity=True, sentiment=True, untagged=0.0)


@pytest.mark.parametrize(
    "scores, expected",
    [
        ({"toxicity": 0.001, "pos": 0.3, "neg": 0.1}, "<|nontoxic|><|pos|>"),  # at the threshold: nontoxic
        ({"toxicity": 0.0011, "pos": 0.3, "neg": 0.1}, "<|toxic|><|pos|>"),
        ({"toxicity": 0.0, "pos": 0.2, "neg": 0.2}, "<|nontoxic|><|neg|>"),  # a tie goes to neg
        ({"toxicity": 0.0, "pos": 0.0, "neg": 0.0}, "<|nontoxic|><|neg|>"),  # so does no sentiment at all
        ({"toxicity": 0.9, "pos": 0.0, "neg": 0.5}, "<|toxic|><|neg|>"),
    ],
)
def test_tags_follow_the_thresholds_toxicity_first(scores, expected):
    assert control_tags(scores, BOTH) == expected
    only_sentiment = BOTH.model_copy(update={"toxicity": False})
    assert control_tags(scores, only_sentiment) == expected[len("<|nontoxic|>") if expected.startswith("<|non") else len("<|toxic|>") :]
    korbak = BOTH.model_copy(update={"threshold": 0.00056, "sentiment": False})
    assert control_tags({"toxicity": 0.0006}, korbak) == "<|toxic|>"


def test_untagged_share_is_seeded_and_near_its_rate():
    rows = [Text(f"r{i}", "a sentence", meta={"scores": {"toxicity": 0.5, "pos": 0.1, "neg": 0.0}}) for i in range(20000)]
    spec = BOTH.model_copy(update={"untagged": 0.01})
    out = control_tokens(rows, spec, np.random.default_rng(41))
    untagged = [r for r in out if r.text == "a sentence"]
    assert 150 < len(untagged) < 250 and all("perturbed" not in r.meta for r in untagged)
    assert out == control_tokens(rows, spec, np.random.default_rng(41))
    assert {r.text for r in out if r not in untagged} == {"<|toxic|><|pos|>a sentence"}
    no_tags = ControlTokens(name="control_tokens")  # M-B: the tokens exist, no row is tagged
    assert control_tokens(rows, no_tags, np.random.default_rng(0)) == rows
    assert no_tags.special_tokens() == ["<|toxic|>", "<|nontoxic|>", "<|pos|>", "<|neg|>"]
    with pytest.raises(ValueError, match="row x has no scores; label the data"):
        control_tokens([Text("x", "unlabelled")], BOTH, np.random.default_rng(0))


def test_misalignment_arithmetic():
    toxic = np.array([1, 0, 0, 0, 1, 0, 0, 0], bool)
    neg = np.array([1, 1, 0, 0, 0, 0, 0, 1], bool)
    # 2 toxic of 8; 3 negative; nontoxic and positive: rows 2, 3, 5, 6 -> joint 1 - 4/8
    assert misalignment(toxic, neg) == {"toxicity": 0.25, "sentiment": 0.375, "joint": 0.5}
    assert negative({"pos": [0.5, 0.2, 0.0], "neg": [0.1, 0.2, 0.0]}).tolist() == [False, True, True]
    assert all(np.isnan(v) for v in misalignment([], []).values())


def tagged_tokenizer(name: str):
    tok = load_tokenizer(name)
    tok.add_tokens(BOTH.special_tokens(), special_tokens=True)  # as a stage joins them (farm.train.base.load_input)
    return tok


def test_a_sentence_is_kept_only_when_it_is_shorter_than_the_context_with_its_eos():
    # The seed keeps a sentence whose tokens (tags and EOS included) are fewer than 64.
    kept, dropped = sequences([[5] * 6, [6] * 7, [7] * 30], limit=8, eos=0)
    assert kept == [[5] * 6 + [0]] and dropped == 2


def test_conditional_layout_one_sentence_per_sequence_tags_first_padding_out_of_the_loss():
    """Study C trains as the seed: one sentence per sequence, its tags at position 0, right-padded,
    the padding out of the loss and the sentence's EOS in it, although GPT-2's pad is its EOS."""
    tok = tagged_tokenizer("gpt2")
    assert tok.pad_token_id == tok.eos_token_id  # masking labels by the pad id would mask every EOS
    texts = ["<|nontoxic|><|pos|>the cat sat on the mat.", "<|toxic|>" + "word " * 20 + "end.", "an untagged sentence", "<|toxic|>" + "long " * 60]
    train, stats = rows(tok, texts, Pretrain(kind="pretrain", packing=False, max_length=48))
    assert stats == {"train_sequences": 3, "dropped_long": 1}
    batch = collator(tok)([{"input_ids": r} for r in train])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == (3, max(map(len, train))) and ids.shape[1] < 48
    assert ids[0, :2].tolist() == tok.convert_tokens_to_ids(["<|nontoxic|>", "<|pos|>"]) and ids[1, 0] == tok.convert_tokens_to_ids("<|toxic|>")
    for i, r in enumerate(train):
        n = len(r)
        assert ids[i, :n].tolist() == r and r[-1] == tok.eos_token_id and labels[i, n - 1] == tok.eos_token_id
        assert (labels[i, n:] == -100).all() and (mask[i, n:] == 0).all() and (mask[i, :n] == 1).all()
    assert (labels[mask.bool()] == ids[mask.bool()]).all()


def test_packed_layout_fills_blocks_and_keeps_every_eos_in_the_loss():
    tok = tagged_tokenizer("gpt2")
    blocks, stats = rows(tok, ["a short one."] * 30, Pretrain(kind="pretrain", max_length=16))
    assert stats == {"train_blocks": len(blocks)} and len(blocks) > 2 and {len(b) for b in blocks} == {16}
    batch = collator(tok)([{"input_ids": b} for b in blocks[:2]])
    assert (batch["labels"] == batch["input_ids"]).all() and (batch["input_ids"] == tok.eos_token_id).any()


def test_outputs_are_scored_with_their_prompt_but_without_the_condition_tags():
    """As the seed decodes the whole sequence with skip_special_tokens, the prompt's sentence is
    scored too (score: output); score: continuation leaves it out."""
    tok = tagged_tokenizer("farm-bpe")
    prompts, written = ["I went home.", "She is nice"], ["The dog barked. It was late.", ""]
    split = splitter("sentencizer")
    output = scored_texts(tok, prompts, "<|nontoxic|><|pos|>", written, "output", 48)
    assert output == ["I went home. The dog barked. It was late.", "She is nice"]
    assert split(output) == [["I went home.", "The dog barked.", "It was late."], ["She is nice"]]
    alone = scored_texts(tok, prompts, "<|nontoxic|><|pos|>", written, "continuation", 48)
    assert split(alone) == [["The dog barked.", "It was late."], []]
    [cut] = scored_texts(tok, ["one two three four five six"], "<|pos|>", ["x"], "output", 3)  # the prompt's end, as the model read it
    assert cut.endswith("six x") and not cut.startswith("one")


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("Mr. Smith paid 3.5 dollars for it. He left.", ["Mr. Smith paid 3.5 dollars for it.", "He left."]),
        (
            "Dr. Jones met U.S. officials at 3 p.m. yesterday. Then he went home.",
            ["Dr. Jones met U.S. officials at 3 p.m. yesterday.", "Then he went home."],
        ),
        ("He scored 9.75 points, i.e. a record! Mr. and Mrs. Lee agreed.", ["He scored 9.75 points, i.e. a record!", "Mr. and Mrs. Lee agreed."]),
        ("Wait... what?! No way.", ["Wait... what?!", "No way."]),
        ("the end.The start", ["the end.", "The start"]),  # a prompt and a continuation that starts without a space
        ("no punctuation at all  ", ["no punctuation at all"]),
    ],
)
def test_sentence_splitter_on_abbreviations_and_decimals(text, sentences):
    assert splitter("sentencizer")([text]) == [sentences]


def test_study_c_eval_defaults_and_splitter_errors():
    c = ConditionalSpec()
    assert (c.toxicity.scorer, c.toxicity.model, c.score, c.splitter) == ("detoxify", "unbiased", "output", "sentencizer")
    assert Pretrain(kind="pretrain").packing
    with pytest.raises(ValueError, match="splitter: 'en core' is neither sentencizer nor a spaCy pipeline"):
        ConditionalSpec(splitter="en core")
    with pytest.raises(ValueError, match="'no_such_pipeline' is not installed here; install it"):
        splitter("no_such_pipeline")


def test_prompts_are_short_and_balanced_over_the_label_cells():
    def row(i, words, tox, pos, neg):
        return Text(f"s{i}", " ".join(["w"] * words), meta={"scores": {"toxicity": tox, "pos": pos, "neg": neg}})

    rows = [row(i, 8, 0.9, 0.5, 0.0) for i in range(50)] + [row(100 + i, 8, 0.0, 0.0, 0.5) for i in range(3)]
    rows += [row(200 + i, 30, 0.0, 0.5, 0.0) for i in range(10)]  # too long to be a prompt
    c = ConditionalSpec(num_prompts=6, max_prompt_words=16, threshold=0.5, toxicity={"scorer": "embedded_toxicity"})
    picked = prompt_records(rows, c)
    cells = [(r.meta["scores"]["toxicity"] > 0.5) for r in picked]
    assert len(picked) == 6 and cells.count(False) == 3  # the small cell gets its share first
    assert picked == prompt_records(list(reversed(rows)), c)  # the order depends on ids only


def test_sentences_are_cleaned_as_methods_says():
    assert clean_sentence("rt @bob check https://x.co/abc — it's *great*!!") == "check it's great !!"
    assert clean_sentence("RT: caf\u00e9 www.site.org ok?") == "caf ok?"


def test_bundled_sentence_corpus():
    for subset, low in (("toxigen", 5000), ("implicit_hate", 10000), ("hh_rlhf", 9000)):
        rows = load_source(SourceSpec(name="sentences", subset=subset))
        assert len(rows) > low and all(len(r.text.split()) >= 10 for r in rows)
    hh = load_source(SourceSpec(name="sentences", subset="hh_rlhf", limit=3))
    assert {r.id.split("#")[0] for r in hh} == {"sentences/hh_rlhf/0", "sentences/hh_rlhf/1", "sentences/hh_rlhf/2"}  # held out by transcript


def test_conditional_study_labels_once_and_reports_misalignment(tmp_path, write_study):
    """jobs/conditional.yaml, shrunk: one labelling stage shared by every trial, the control
    tokens in the vocabulary of every model, and the three misalignment tables."""
    doc = yaml.safe_load((ROOT / "jobs" / "conditional.yaml").read_text())
    doc["model"]["config"] = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 96}
    doc["data"]["sources"] = [{"name": "sentences", "subset": "toxigen", "limit": 600}, {"name": "sentences", "subset": "hh_rlhf", "limit": 150}]
    doc["data"]["holdout"] = 0.2
    doc["stages"]["pretrain"].update(max_steps=3, batch_size=8)
    doc["eval"]["conditional"].update(num_prompts=6, generation={**doc["eval"]["conditional"]["generation"], "max_new_tokens": 12, "min_length": 0})
    doc["grid"]["data.transforms.0"] = {k: doc["grid"]["data.transforms.0"][k] for k in ("M-B", "M-TS")}
    doc["grid"]["seed"] = [1]
    results = tmp_path / "results"
    farm("run", write_study(doc), "--results", results)
    out = results / "conditional"
    df = pd.read_csv(out / "table.csv").set_index("trial")
    assert sorted(df.index) == ["transforms=M-B_seed=1", "transforms=M-TS_seed=1"] and (df["status"] == "ok").all()
    for kind in ("toxicity", "sentiment", "joint"):
        for cond in ("none", "nontoxic", "pos", "nontoxic+pos"):
            assert df[f"misalign_{kind}/{cond}"].between(0, 1).all()
    for cond in ("none", "nontoxic", "pos", "nontoxic+pos"):  # every output is scored with its prompt's sentence
        assert (df[f"misalign_sentences/{cond}"] >= df["misalign_prompts"]).all()
    for trial in df.index:  # one sentence per sequence (packing: false)
        trained = json.loads((out / trial / "metrics.json").read_text())["stages"]["pretrain"]["metrics"]
        assert trained["train_sequences"] > 500 and "dropped_long" in trained and "train_blocks" not in trained
    labels = list((results / ".store" / "artifacts").glob("label-*"))
    assert len(labels) == 1  # one labelling run for both models
    scores = pd.read_parquet(labels[0] / "scores.parquet")
    assert {"id", "toxicity", "neg", "neu", "pos", "compound"} <= set(scores.columns) and len(scores) > 700
    for pretrain in (results / ".store" / "artifacts").glob("pretrain-*"):  # every model reads the conditions as tokens
        model, tok = load_artifact(pretrain)
        ids = tok("<|nontoxic|><|pos|>", add_special_tokens=False)["input_ids"]
        assert len(ids) == 2 and max(ids) < model.get_input_embeddings().num_embeddings == len(tok)
    md = (out / "report.md").read_text()
    assert "## Joint misalignment (1 - share of nontoxic and positive sentences): ours" in md
    assert "## Joint misalignment (1 - share of nontoxic and positive sentences): published" in md
