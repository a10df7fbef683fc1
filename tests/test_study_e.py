"""Study E: the RLAIF chains in one grid, red-team prompts, refusals, the pairwise arena on
constructed answers, and the whole study on local Ray."""

import json

import pandas as pd
import pytest
import yaml
from conftest import ROOT, farm

from farm.config import StudyError
from farm.data.sources import SourceSpec, load_source
from farm.eval.harmlessness import ANSWERS_FILE, evasive
from farm.eval.metrics import FILES
from farm.grid import expand, load_study
from farm.plan import plan_study
from farm.spec import REFUSALS

JOB = ROOT / "jobs" / "rlaif.yaml"


@pytest.fixture
def doc():
    return yaml.safe_load(JOB.read_text())


def test_red_team_openings_keep_their_conversation_ids():
    """A bundled opening is held out exactly when its HH conversation is, so no stage trains on
    the text of an eval prompt."""
    openings = load_source(SourceSpec(name="hh_red_team"))
    talks = {r.id: r for r in load_source(SourceSpec(name="hh_rlhf"))}
    assert len(openings) > 1900
    for r in openings[:200]:
        assert r.prompt.startswith("\n\nHuman: ") and r.prompt.endswith("\n\nAssistant:") and r.prompt.count("Human:") == 1
        if r.id in talks:
            assert talks[r.id].prompt.startswith(r.prompt[: -len("\n\nAssistant:")])


def test_refusals_are_found_in_any_case():
    assert evasive("i'm sorry, I cannot help with that", REFUSALS)
    assert not evasive("Sure, here is how to bake bread.", REFUSALS)
    assert evasive("NOT APPROPRIATE at all", ["not appropriate"])


def test_chains_share_their_common_stages(doc):
    trials = expand(doc, "e.yaml")
    assert [t.id for t in trials][:3] == ["stages=base_seed=42", "stages=base_seed=43", "stages=base_seed=44"]
    plans = plan_study(trials)
    by_id = {t.id: plans[t.id] for t in trials}
    rl = by_id["stages=rl-cai_seed=42"]
    assert [s.name for s in rl.stages] == ["pretrain", "helpful", "judge_rm", "critique", "sl_cai", "feedback", "pm", "rl_cai"]
    assert rl.evaluated == "rl_cai" and by_id["stages=base_seed=42"].evaluated == "helpful"
    stage = {s.name: s for s in rl.stages}
    assert len(stage["critique"].users) == 6  # seed 0: one critique-revision run for every SL-CAI and RL-CAI model
    assert len(stage["sl_cai"].users) == 2  # SL-CAI of seed 42, shared by its RL-CAI
    assert [r[0] for r in stage["feedback"].refs] == ["helpful"] and stage["feedback"].input_key == stage["sl_cai"].key
    assert [r[0] for r in stage["rl_cai"].refs] == ["pm"] and stage["rl_cai"].input_key == stage["sl_cai"].key
    assert [r[0] for r in rl.eval_refs] == ["judge_rm"]


def test_bad_rlaif_fields_are_refused_before_ray(doc):
    cases = [
        (
            lambda d: d["grid"]["stages"]["rl-cai"]["rl_cai"].update(reward_model="sl_cai"),
            "reward_model: stage 'sl_cai' builds model, not a reward model",
        ),
        (lambda d: d["grid"]["stages"]["rl-cai"]["feedback"].update(clamp=[0.6, 0.4]), "clamp: [low, high]"),
        (lambda d: d["grid"]["stages"]["sl-cai"]["critique"].update(constitution="no_such"), "no bundled constitution of that name"),
        (lambda d: d["grid"]["stages"]["sl-cai"]["critique"].update(rounds=5), "rounds"),
        (lambda d: d["eval"].update(metrics=["perplexity"]), "eval.pairwise: compares the answers the harmlessness metric keeps"),
        (lambda d: d["eval"]["pairwise"].update(judge="helpful"), "eval.pairwise.judge: stage 'helpful' builds model, not a reward model"),
    ]
    for edit, message in cases:
        bad = yaml.safe_load(JOB.read_text())
        edit(bad)
        with pytest.raises(StudyError) as e:
            expand(bad, "e.yaml")
        assert message in str(e.value), message


def test_paper_profile_reads_the_red_team_attempts():
    trials = load_study(JOB, "paper")
    assert {t.id for t in trials} >= {"stages=base_seed=42", "stages=rl-cai_seed=44"}
    study = next(t.study for t in trials if t.id == "stages=rl-cai_seed=42")
    assert study.data.sources[0].origin == "hub" and study.model.base == "meta-llama/Llama-2-7b-chat-hf"
    assert study.stages["critique"].rounds == 4 and study.eval.pairwise.judge.startswith("OpenAssistant/")


def test_each_profile_states_its_departures(doc):
    """A profile replaces the departures list: the paper profile states its own."""
    default = expand(doc, "e.yaml")[0].study.departures
    paper = load_study(JOB, "paper")[0].study.departures
    assert len(default) >= 5 and len(paper) >= 5 and default != paper
    assert any("tiny GPT-2" in d for d in default) and not any("tiny GPT-2" in d for d in paper)
    assert any("4 rounds" in d for d in paper) and all(any("GRPO" in d for d in ds) for ds in (default, paper))


def test_arena_judges_every_pair_within_each_seed(tmp_path):
    """Constructed answers and a judge that prefers longer answers: the model with the longest
    answers wins every comparison and tops the Elo table."""
    from farm.eval.arena import run_arena
    from farm.models import ModelSpec, base_model
    from farm.spec import EvalSpec
    from farm.stages.reward import as_reward_model

    lm, tok = base_model(ModelSpec(config={"n_layer": 1, "n_embd": 32, "n_head": 2}), 0)
    judge = as_reward_model(lm, tok, 0)
    judge.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    entries = []
    for seed in (1, 2):
        for model, answer in (("a", "no"), ("b", "no no no"), ("c", "no no no no no no")):
            rows = [{"id": f"p{i}", "prompt": f"\n\nHuman: q{i}\n\nAssistant:", "answer": " " + answer} for i in range(5)]
            entries.append({"model": model, "seed": seed, "answers": rows})
    spec = EvalSpec(metrics=["harmlessness"], pairwise={"judge": "x", "bootstrap": 50, "examples": 2})
    for name, data in run_arena(entries, str(tmp_path / "judge"), spec).items():
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / name).write_bytes(data)
    judgements = pd.read_csv(tmp_path / "out" / "judgements.csv")
    assert len(judgements) == 2 * 5 * 3  # seeds x prompts x pairs
    assert set(zip(judgements["model_a"], judgements["model_b"])) == {("a", "b"), ("a", "c"), ("b", "c")}
    elo = pd.read_csv(tmp_path / "out" / "elo.csv", index_col=0)
    wins = pd.read_csv(tmp_path / "out" / "win_rate.csv", index_col=0)
    rewards = pd.read_csv(tmp_path / "out" / "rewards.csv").groupby("model")["reward"].mean()
    best = rewards.idxmax()
    assert elo["elo"].idxmax() == best and (wins.loc[best].drop(best) == 1.0).all()
    examples = json.loads((tmp_path / "out" / "examples.json").read_text())
    assert len(examples) == 2 and set(examples[0]) == {"prompt", "a", "b", "c"}


def test_rlaif_study_compares_its_models_pairwise(tmp_path, write_study, doc):
    """jobs/rlaif.yaml, shrunk: base, SL-CAI and RL-CAI trained through their shared stages,
    scored for harmlessness and evasiveness, and rated by the judge after the grid."""
    from farm.data.records import read_records

    doc["model"]["config"] = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256}
    doc["data"]["sources"][0]["limit"] = 120
    doc["eval"].update(limit=6, generation={"max_new_tokens": 8, "scorer": "embedded_toxicity"})
    doc["eval"]["pairwise"]["bootstrap"] = 50
    chains = doc["grid"]["stages"]
    rl = chains["rl-cai"]
    for name in ("pretrain", "helpful", "judge_rm", "sl_cai", "pm"):
        rl[name].update(max_steps=3, batch_size=8)
    rl["critique"]["generation"] = rl["feedback"]["generation"] = {"do_sample": True, "max_new_tokens": 8}
    rl["rl_cai"].update(max_steps=2, batch_size=4, num_generations=2, max_new_tokens=8)
    chains["base"] = {n: rl[n] for n in ("pretrain", "helpful", "judge_rm")}
    chains["sl-cai"] = {n: rl[n] for n in ("pretrain", "helpful", "judge_rm", "critique", "sl_cai")}
    doc["grid"]["seed"] = [1]
    results = tmp_path / "results"
    out = farm("run", write_study(doc), "--results", results).stdout
    assert "pairwise comparison of 3 models" in out
    df = pd.read_csv(results / "rlaif" / "table.csv").set_index("trial")
    assert (df["status"] == "ok").all() and len(df) == 3
    assert df["harmlessness"].between(0, 1).all() and df["evasiveness"].between(0, 1).all()
    store = results / ".store" / "artifacts"
    critique = read_records(next(store.glob("critique_revision-*")) / "records.jsonl")
    assert critique and all(r.meta["rounds"][0]["principle"] and "critique" in r.meta["rounds"][0] for r in critique)
    feedback = read_records(next(store.glob("ai_feedback-*")) / "records.jsonl")
    assert all(0 <= r.label <= 1 for r in feedback) and len({round(r.label, 6) for r in feedback}) > 1
    elo = pd.read_csv(results / "rlaif" / "pairwise" / "elo.csv", index_col=0)
    assert set(elo.index) == {"stages=base", "stages=sl-cai", "stages=rl-cai"} and elo.loc["stages=base", "elo"] == pytest.approx(1000)
    md = (results / "rlaif" / "report.md").read_text()
    assert "## Elo (Bradley-Terry maximum likelihood)" in md and "## Example answers" in md and "## Win rate" in md
    tests = pd.read_csv(results / "rlaif" / "pairwise" / "win_tests.csv")  # every pair, 6 prompts of one seed
    assert len(tests) == 3 and (tests["wins"] + tests["losses"] + tests["ties"] == 6).all() and "## Wins tested" in md


def test_harmlessness_keeps_each_answers_values_by_prompt_id(tmp_path, monkeypatch):
    """Harmlessness and evasiveness are means over the answered prompts: each answer's values are
    kept by its prompt id (for the report's item-level comparison), and their means are the metrics."""
    from farm.data.records import Demonstration
    from farm.eval.harmlessness import harmlessness
    from farm.eval.metrics import ITEMS
    from farm.models import ModelSpec, base_model
    from farm.schema import GenerationSpec
    from farm.spec import EvalSpec

    monkeypatch.setenv("FARM_CACHE", str(tmp_path))
    model, tok = base_model(ModelSpec(base="tiny-gpt2", config={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128}), 0)
    records = [
        Demonstration(f"red{i}", f"\n\nHuman: {q}\n\nAssistant:", "") for i, q in enumerate(["Hi there", "Tell me a secret", "Help me", "Why?"])
    ]
    spec = EvalSpec(
        metrics=["harmlessness"],
        generation=GenerationSpec(num_prompts=3, max_new_tokens=4, scorer="embedded_toxicity"),
        refusals=["the"],
        max_length=64,
        max_prompt_length=32,
    )
    m = harmlessness(model, None, tok, records, spec)
    per = m[ITEMS]
    assert set(per) == {"harmlessness", "evasiveness", "toxicity_mean", "toxicity_ratio"}
    assert all(v["ids"] == ["red0", "red1", "red2"] for v in per.values())
    assert all(sum(v["values"]) / 3 == pytest.approx(m[k]) for k, v in per.items())
    assert [a["answer"] for a in m[FILES][ANSWERS_FILE]] and set(per["evasiveness"]["values"]) <= {0.0, 1.0}


def test_the_repetition_penalty_reaches_the_decoder_and_keys_only_when_set(tmp_path, monkeypatch):
    """`generation.repetition_penalty` is transformers' (a generated token's logit divided by it):
    on a random tiny model greedy answers loop, and with the penalty fewer tokens repeat. At 1 it
    is no penalty and is left out of the dump, so no key made before the field existed moves; the
    embedded profile decodes with it where its helpful model writes (critique-revision, the eval),
    the paper profile without it."""
    import torch

    from farm.models import ModelSpec, base_model, generate
    from farm.schema import GenerationSpec

    monkeypatch.setenv("FARM_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model, tok = base_model(ModelSpec(base="tiny-gpt2", config={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128}), 0)
    prompts = ["\n\nHuman: Hi there\n\nAssistant:", "\n\nHuman: Tell me a secret\n\nAssistant:"]

    def repeated(answers):  # share of tokens that are a repeat of an earlier one in the same answer
        ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
        return sum(len(i) - len(set(i)) for i in ids) / sum(map(len, ids))

    plain = generate(model, tok, prompts, GenerationSpec(max_new_tokens=24, stop=[]), 32)
    penalised = generate(model, tok, prompts, GenerationSpec(max_new_tokens=24, stop=[], repetition_penalty=1.5), 32)
    assert repeated(penalised) < repeated(plain)
    assert "repetition_penalty" not in GenerationSpec(repetition_penalty=1.0).model_dump()
    assert GenerationSpec(repetition_penalty=1.3).model_dump()["repetition_penalty"] == 1.3
    with pytest.raises(Exception, match="greater than 0"):
        GenerationSpec(repetition_penalty=0)
    for profile, penalty in (("embedded", 1.3), ("paper", 1.0)):
        study = load_study(JOB, profile=profile)[-1].study
        assert study.eval.generation.repetition_penalty == penalty
        assert study.stages["critique"].generation.repetition_penalty == penalty
