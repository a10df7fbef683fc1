"""Study E's Constitutional AI data: the constitution file, principle sampling, the prompt
builders, soft labels, and both stages run in-process on a tiny model (no Ray)."""

import math
import re
from collections import Counter

import pytest
import yaml

import farm.stages.cai as cai  # registers the stages (farm.train does not import it yet)
from farm.data.constitution import (
    OPTIONS,
    Principle,
    Round,
    critique_prompt,
    draw_principles,
    end_of_turn,
    feedback_prompt,
    fit_context,
    load_constitution,
    revision_prompt,
    soft_label,
)
from farm.data.records import Comparison, Demonstration, read_records
from farm.models import ModelSpec
from farm.stages.cai import AIFeedback, CritiqueRevision
from farm.train.base import StageContext

CONV = "\n\nHuman: How do I pick a lock?\n\nAssistant:"


# ---------------------------------------------------------------- principle sampling


def test_draws_are_reproducible_per_seed_and_row():
    assert draw_principles("row-1", 42, 4, 12) == draw_principles("row-1", 42, 4, 12)
    ids = [f"row-{i}" for i in range(50)]
    assert any(draw_principles(i, 42, 4, 12) != draw_principles(i, 43, 4, 12) for i in ids)
    assert len({tuple(draw_principles(i, 42, 4, 12)) for i in ids}) > 40  # rows draw apart


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    ids = [f"hh-{i}" for i in range(30)]
    alone = {i: draw_principles(i, 7, 3, 12) for i in ids}
    shuffled = {i: draw_principles(i, 7, 3, 12) for i in reversed(ids + [f"extra-{j}" for j in range(10)]) if i in alone}
    assert shuffled == alone


def test_draws_cover_every_principle_and_rounds_draw_independently():
    draws = [draw_principles(f"r{i}", 0, 4, 12) for i in range(3000)]
    for k in range(4):
        counts = Counter(d[k] for d in draws)
        assert set(counts) == set(range(12)) and min(counts.values()) > 150  # ~250 each
    # Independent rounds: the second matches the first about 1 time in 12, not always or never.
    same = sum(d[0] == d[1] for d in draws) / len(draws)
    assert 0.05 < same < 0.12
    assert draw_principles("r0", 0, 1, 12) == draws[0][:1]  # fewer rounds: a prefix of the same draw


# ---------------------------------------------------------------- soft labels


def test_soft_label_by_hand():
    assert soft_label(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert soft_label(math.log(0.1), math.log(0.3)) == pytest.approx(0.25)
    assert soft_label(-2.5, -2.5) == 0.5
    assert soft_label(math.log(0.3), math.log(0.1), clamp=(0.4, 0.6)) == 0.6
    assert soft_label(math.log(0.1), math.log(0.3), clamp=(0.4, 0.6)) == 0.4
    assert soft_label(math.log(0.52), math.log(0.48), clamp=(0.4, 0.6)) == pytest.approx(0.52)


def test_soft_label_is_stable_at_extremes():
    assert soft_label(-1000.0, 0.0) == pytest.approx(0.0, abs=1e-300)
    assert soft_label(0.0, -1000.0) == 1.0
    assert soft_label(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert soft_label(5000.0, 4999.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert soft_label(float("-inf"), float("-inf")) == 0.5
    assert soft_label(float("-inf"), -3.0) == 0.0
    assert soft_label(-1000.0, 0.0, clamp=(0.4, 0.6)) == 0.4


# ---------------------------------------------------------------- the constitution file


def test_bundled_constitution_loads():
    c = load_constitution("default")
    assert len(c.principles) >= 8 and len({p.name for p in c.principles}) == len(c.principles)
    assert all(p.critique and p.revision and p.preference.endswith("?") for p in c.principles)
    assert len(c.examples) >= 2
    assert all(e.prompt.startswith("\n\nHuman:") and e.prompt.endswith("\n\nAssistant:") for e in c.examples)


def _write(tmp_path, doc, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def _principle(i):
    return {"name": f"p{i}", "critique": "Find harm.", "revision": "Remove harm.", "preference": "Which is safer?"}


@pytest.mark.parametrize(
    "doc, message",
    [
        (
            {"principles": [_principle(1), _principle(2), {k: v for k, v in _principle(3).items() if k != "revision"}]},
            "principle 3 has no 'revision'",
        ),
        ({"principles": []}, "'principles' must be a non-empty list"),
        ({"examples": []}, "'principles' must be a non-empty list"),
        (["just", "a", "list"], "expected a mapping with 'principles'"),
        ({"principles": [{**_principle(1), "critique": "  "}]}, "principle 1: 'critique' must be non-empty text"),
        ({"principles": [{**_principle(1), "revison": "x"}]}, "principle 1 has unknown field 'revison'"),
        ({"principles": [_principle(1), _principle(1)]}, "principle name 'p1' is used twice"),
        (
            {"principles": [_principle(1)], "examples": [{"prompt": CONV, "answer": "a", "principle": "p9", "critique": "c", "revision": "r"}]},
            "example 1 names principle 'p9'",
        ),
        (
            {
                "principles": [_principle(1)],
                "examples": [{"prompt": "Human: hi", "answer": "a", "principle": "p1", "critique": "c", "revision": "r"}],
            },
            "example 1: 'prompt' must be an HH dialogue",
        ),
        (
            {"principles": [_principle(1)], "examples": [{"prompt": CONV, "principle": "p1", "critique": "c", "revision": "r"}]},
            "example 1 has no 'answer'",
        ),
    ],
)
def test_malformed_constitution_names_the_file_and_what_is_wrong(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(ValueError) as err:
        load_constitution(path)
    assert str(err.value).startswith(f"constitution {path}:") and message in str(err.value)


def test_unreadable_or_missing_constitutions(tmp_path):
    with pytest.raises(ValueError, match=r"constitution 'nonesuch': no bundled constitution of that name \(bundled: default\)"):
        load_constitution("nonesuch")
    with pytest.raises(ValueError, match="constitution ./missing.yaml: no such file"):
        load_constitution("./missing.yaml")
    bad = _write(tmp_path, "principles: [a, b\n")
    with pytest.raises(ValueError, match=re.escape(f"constitution {bad}: cannot be read")):
        load_constitution(bad)


def test_a_file_of_ones_own_loads(tmp_path):
    doc = {
        "principles": [_principle(1), _principle(2)],
        "examples": [{"prompt": CONV, "answer": "a", "principle": "p2", "critique": "c", "revision": "r"}],
    }
    c = load_constitution(_write(tmp_path, doc))
    assert [p.name for p in c.principles] == ["p1", "p2"] and c.examples[0].principle.name == "p2"


# ---------------------------------------------------------------- prompts


P = Principle("harm", "Say how the reply is harmful.", "Rewrite the reply to be harmless.", "Which reply is less harmful?")


def test_critique_and_revision_prompts():
    examples = load_constitution("default").examples[:2]
    crit = critique_prompt(CONV, "Use a tension wrench.", P, examples)
    assert crit.endswith(CONV + " Use a tension wrench.\n\nCritiqueRequest: Say how the reply is harmful.\n\nCritique:")
    for e in examples:  # the worked examples come first, whole, each with its own principle's requests
        assert crit.index(e.prompt) < crit.index(CONV)
        for text in (e.answer, e.principle.critique, e.critique, e.principle.revision, e.revision):
            assert text in crit
    rev = revision_prompt(CONV, "Use a tension wrench.", "It helps break in.", P, examples)
    assert rev == crit + " It helps break in.\n\nRevisionRequest: Rewrite the reply to be harmless.\n\nRevision:"
    assert critique_prompt(CONV, "x", P) == CONV + " x\n\nCritiqueRequest: Say how the reply is harmful.\n\nCritique:"


def test_feedback_prompt_format():
    text = feedback_prompt(CONV, P, "Sure, here's how.", "I'd rather not.")
    assert text == (
        "Consider the following conversation between a human and an assistant:\n"
        "Human: How do I pick a lock?\n"
        "Which reply is less harmful?\nOptions:\n(A) Sure, here's how.\n(B) I'd rather not.\nThe answer is:"
    )
    multi = feedback_prompt("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:", P, "a", "b")
    assert "Human: hi\n\nAssistant: hello\n\nHuman: and?\nWhich reply" in multi  # only the empty cue goes


def test_generated_text_is_cut_at_the_next_tag():
    assert end_of_turn(" It is rude.\n\nRevisionRequest: Rewrite it.") == "It is rude."
    assert end_of_turn("Revision: more") == ""
    assert end_of_turn("A fine answer about Critique: as a word") == "A fine answer about Critique: as a word"


def test_revise_keeps_the_previous_answer_when_a_revision_is_empty():
    c = load_constitution("default")
    rows = [Demonstration(f"r{i}", CONV, "") for i in range(3)]

    def ask(prompts):  # a revision wraps the answer it revises; row r1's revisions come back empty
        if prompts[0].endswith("Critique:"):
            return [f"critique {i}" for i in range(len(prompts))]
        answers = [p[len(CONV) + 1 : p.index("\n\nCritiqueRequest:")] for p in prompts]
        return ["" if i == 1 else f"rev({a})" for i, a in enumerate(answers)]

    final, history, counts = cai.revise(ask, rows, ["a0", "a1", "a2"], c, (), 2, seed=5)
    assert final == ["rev(rev(a0))", "a1", "rev(rev(a2))"] and counts == {"empty_revisions": 2, "context_shortened": 0}
    assert [h["revision"] for h in history[1]] == ["", ""] and history[0][1]["revision"] == "rev(rev(a0))"
    names = [p.name for p in c.principles]
    assert [h["principle"] for h in history[0]] == [names[k] for k in draw_principles("r0", 5, 2, len(names))]


Q = Principle("rude", "Say where the reply is rude.", "Rewrite the reply politely.", "Which reply is politer?")


def test_a_growing_transcript_holds_the_earlier_rounds_in_order():
    examples = load_constitution("default").examples[:1]
    earlier = (Round(P, "It helps break in.", "I can't help with that."),)
    crit = critique_prompt(CONV, "Use a tension wrench.", Q, examples, earlier)
    assert crit == critique_prompt(CONV, "Use a tension wrench.", P, examples)[: -len("\n\nCritique:")] + (
        "\n\nCritique: It helps break in.\n\nRevisionRequest: Rewrite the reply to be harmless.\n\nRevision: I can't help with that."
        "\n\nCritiqueRequest: Say where the reply is rude.\n\nCritique:"
    )
    assert crit.index(examples[0].prompt) < crit.index(CONV)  # the worked example stays in front
    assert (
        revision_prompt(CONV, "Use a tension wrench.", "Curt.", Q, examples, earlier)
        == crit + " Curt.\n\nRevisionRequest: Rewrite the reply politely.\n\nRevision:"
    )


def _recording_ask(seen):
    """A fake model: critique k of a row is "c<k>", its revision "r<k>"; every prompt is kept."""

    def ask(prompts):
        seen.append(prompts)
        tag = "c" if prompts[0].endswith("Critique:") else "r"
        return [f"{tag}{(len(seen) - 1) // 2}"] * len(prompts)

    return ask


def test_round_two_reads_round_one_on_the_transcript_and_the_latest_answer_without():
    c = load_constitution("default")
    row = Demonstration("r0", CONV, "")
    first, second = (c.principles[k] for k in draw_principles("r0", 5, 2, len(c.principles)))
    seen = []
    final, history, _ = cai.revise(_recording_ask(seen), [row], ["a"], c, c.examples[:1], 2, 5, transcript=True)
    assert final == ["r1"] and [h["critique"] for h in history[0]] == ["c0", "c1"]
    crit2 = seen[2][0]
    assert crit2 == critique_prompt(CONV, "a", second, c.examples[:1], (Round(first, "c0", "r0"),))
    parts = [first.critique, "c0", first.revision, "r0", second.critique]  # in order, after the first answer
    at = [crit2.index(x, crit2.index(CONV + " a")) for x in parts]
    assert at == sorted(at) and crit2.endswith(f"CritiqueRequest: {second.critique}\n\nCritique:")
    assert seen[3][0] == crit2 + f" c1\n\nRevisionRequest: {second.revision}\n\nRevision:"
    seen = []
    cai.revise(_recording_ask(seen), [row], ["a"], c, c.examples[:1], 2, 5)  # Bai et al.: the pair afresh
    assert seen[2][0] == critique_prompt(CONV, "r0", second, c.examples[:1]) and "c0" not in seen[2][0]


@pytest.mark.parametrize("transcript", [False, True])
def test_one_round_asks_the_same_prompts_either_way(transcript):
    c = load_constitution("default")
    pr = c.principles[draw_principles("r0", 5, 1, len(c.principles))[0]]
    seen = []
    cai.revise(_recording_ask(seen), [Demonstration("r0", CONV, "")], ["a"], c, c.examples[:2], 1, 5, transcript=transcript)
    assert seen[0] == [critique_prompt(CONV, "a", pr, c.examples[:2])]
    assert seen[1] == [revision_prompt(CONV, "a", "c0", pr, c.examples[:2])]
    assert seen[0][0].startswith(c.examples[0].prompt)


def test_an_empty_revision_leaves_the_transcript_unchanged():
    c = load_constitution("default")
    seen = []

    def ask(prompts):  # round 1 revises to nothing
        seen.append(prompts)
        return ["crit"] if len(seen) % 2 else ["" if len(seen) == 2 else "better"]

    final, _, counts = cai.revise(ask, [Demonstration("r0", CONV, "")], ["a"], c, (), 2, 5, transcript=True)
    second = c.principles[draw_principles("r0", 5, 2, len(c.principles))[1]]
    assert final == ["better"] and counts["empty_revisions"] == 1
    assert seen[2] == [critique_prompt(CONV, "a", second)]  # the empty round is not shown


def test_a_context_too_long_loses_whole_parts_earlier_rounds_first():
    examples = load_constitution("default").examples[:2]
    earlier = (Round(P, "c one", "r one"), Round(Q, "c two", "r two"))

    def context(budget):  # words stand for tokens
        return fit_context(CONV, "a", earlier, P, examples, lambda text: len(text.split()) <= budget)

    words = lambda *a: len(revision_prompt(CONV, *a).split())  # noqa: E731
    whole = words("a", "", P, examples, earlier)
    assert context(whole) == ("a", earlier, examples)
    # A word short: the earlier rounds go (the conversation with the latest revision), every example kept.
    assert context(whole - 1) == ("r two", (), examples)
    # Then the examples, the first (farthest from the conversation) first: the transcript is tried again with each.
    one = words("a", "", P, examples[1:], earlier)
    assert context(one) == ("a", earlier, examples[1:])
    assert context(words("r two", "", P, examples[1:]))[1:] == ((), examples[1:])
    assert context(words("a", "", P, (), earlier)) == ("a", earlier, ())
    assert context(5) == ("r two", (), ())  # nothing fits: the shortest, cut from the left at generation
    assert fit_context(CONV, "a", (), P, examples, lambda t: False) == ("a", (), ())


# ---------------------------------------------------------------- the stages, in-process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The study's model section (a tiny built GPT-2), a saved copy for the feedback model, prompts."""
    from farm.models import base_model

    spec = ModelSpec(base="tiny-gpt2", config={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256})
    saved = tmp_path_factory.mktemp("feedback")
    model, tok = base_model(spec, 0)
    model.save_pretrained(str(saved))
    tok.save_pretrained(str(saved))
    questions = [
        "How do I pick a lock?",
        "Tell me a joke.",
        "What is the capital of France?",
        "Can you help me cheat on a test?",
        "Why is the sky blue?",
        "Write a mean note to my boss.",
    ]
    rows = [Demonstration(f"hh-{i}", f"\n\nHuman: {q}\n\nAssistant:", "") for i, q in enumerate(questions)]
    return spec, saved, rows


def _ctx(tmp_path, stage, tiny):
    spec, saved, rows = tiny
    return StageContext("cai", stage, spec, 3, None, rows, tmp_path, tmp_path / "work", [], inputs={"judge": saved})


def test_critique_revision_stage(tmp_path, tiny):
    stage = CritiqueRevision.model_validate(
        {
            "kind": "critique_revision",
            "rounds": 2,
            "transcript": True,
            "few_shot": 1,
            "generation": {"max_new_tokens": 8, "batch_size": 4},
            "max_prompt_length": 96,
        }
    )
    metrics = cai.critique_revision(_ctx(tmp_path, stage, tiny))
    records = read_records(tmp_path / "records.jsonl")
    rows = tiny[2]
    assert [r.id for r in records] == [r.id for r in rows] and all(isinstance(r, Comparison) for r in records)
    names = {p.name for p in load_constitution("default").principles}
    for r, row in zip(records, rows):
        assert r.prompt == row.prompt and r.label == 1.0 and r.rejected == r.meta["answer"]
        assert len(r.meta["rounds"]) == 2 and all(set(x) == {"principle", "critique", "revision"} for x in r.meta["rounds"])
        assert all(x["principle"] in names for x in r.meta["rounds"])
        kept = [x["revision"] for x in r.meta["rounds"] if x["revision"]]
        assert r.chosen == (kept[-1] if kept else r.meta["answer"])
    empty = sum(not x["revision"] for r in records for x in r.meta["rounds"])
    assert metrics["rows"] == 6 and metrics["rounds"] == 2 and metrics["empty_revisions"] == empty
    # The worked example alone is ~150 tokens: no round's prompt had room for it within 96 - 8.
    assert metrics["context_shortened"] == 12
    assert 0 <= metrics["unchanged"] <= 1 and metrics["answer_words"] >= 0
    again = tmp_path / "again"
    again.mkdir()
    cai.critique_revision(_ctx(again, stage, tiny))  # greedy and seeded: the same data
    assert [r.meta for r in read_records(again / "records.jsonl")] == [r.meta for r in records]


@pytest.mark.parametrize("clamp", [None, (0.4, 0.6)])
def test_ai_feedback_stage(tmp_path, tiny, clamp):
    from farm.models import load_artifact

    spec, saved, rows = tiny
    stage = AIFeedback.model_validate(
        {
            "kind": "ai_feedback",
            "feedback_model": "judge",
            "clamp": clamp,
            "batch_size": 5,
            "max_length": 128,
            "max_prompt_length": 64,
            "generation": {"do_sample": True, "top_k": 0, "max_new_tokens": 8, "batch_size": 4},
        }
    )
    metrics = cai.ai_feedback(_ctx(tmp_path, stage, tiny))
    records = read_records(tmp_path / "records.jsonl")
    assert [r.id for r in records] == [r.id for r in rows] and metrics["rows"] == 6
    principles = load_constitution("default").principles
    low, high = clamp or (0.0, 1.0)
    assert all(low <= r.label <= high for r in records)
    assert metrics["p_a_mean"] == pytest.approx(sum(r.label for r in records) / 6)
    assert metrics["identical_samples"] < 1  # sampling draws two different answers
    # Each label is the soft label of the feedback model's log-probs of " (A)" and " (B)",
    # checked unbatched against the eval's response_logprobs (the same cut of the prompt).
    judge, tok = load_artifact(saved)
    for r, row in zip(records[:2], rows):
        pr = principles[draw_principles(row.id, 3, 1, len(principles))[0]]
        assert r.meta["principle"] == pr.name
        text = feedback_prompt(row.prompt, pr, r.chosen, r.rejected)
        la, lb = (option_logprob(judge, tok, text, o, 128) for o in OPTIONS)
        assert r.meta["logprobs"] == pytest.approx([la, lb], abs=1e-4)
        assert r.label == pytest.approx(soft_label(la, lb, clamp), abs=1e-6)


def option_logprob(model, tok, prompt: str, option: str, max_length: int) -> float:
    """log P(option | prompt) unbatched: the option's own tokens, no EOS after them (the feedback
    model picks an option; it does not end its answer there)."""
    import torch

    from farm.models import encode_prompt

    o = tok(option, add_special_tokens=False)["input_ids"]
    p = encode_prompt(tok, prompt, max_length - len(o))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + o])).logits[0].float(), -1)
    return sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(o))


def test_stage_specs_validate(tiny):
    _, saved, _ = tiny
    s = CritiqueRevision.model_validate({"kind": "critique_revision", "rounds": 4, "constitution": "default"})
    assert s.few_shot == 1 and s.shape == "demonstration" and s.produces == "records"
    with pytest.raises(ValueError, match="rounds"):
        CritiqueRevision.model_validate({"kind": "critique_revision", "rounds": 5})
    f = AIFeedback.model_validate({"kind": "ai_feedback", "feedback_model": str(saved), "clamp": [0.4, 0.6]})
    assert f.clamp == (0.4, 0.6) and f.refs()["feedback_model"] == str(saved)
    with pytest.raises(ValueError, match="clamp"):
        AIFeedback.model_validate({"kind": "ai_feedback", "feedback_model": str(saved), "clamp": [0.6, 0.9]})


def test_importing_the_stages_module_stays_light():
    import subprocess
    import sys

    code = "import sys, farm.stages.cai, farm.data.constitution; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
