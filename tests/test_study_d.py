"""Study D: stages that name other stages (the DAG of a study), the ranking subsets nested
across k, the sampler's budgets, built records read back, and the whole study on local Ray."""

import copy

import pytest
import yaml
from conftest import ROOT, farm

from farm.config import StudyError
from farm.data.prepare import training_records
from farm.data.records import Comparison, Demonstration, Ranking, read_records, write_records
from farm.data.transforms import nested_ranking, ranking_subset
from farm.grid import expand, load_study
from farm.plan import plan_study
from farm.schema import RankingSubset

JOB = ROOT / "jobs" / "diversity.yaml"


@pytest.fixture
def doc():
    return yaml.safe_load(JOB.read_text())


def _rankings(n: int, k: int = 4) -> list:
    return [Ranking(f"row{i}", f"p{i}", tuple(f"a{i}-{j}" for j in range(k)), tuple(float(k - j) for j in range(k))) for i in range(n)]


# ---------------------------------------------------------------- ranking subsets


def test_ranking_sets_nest_across_lengths():
    """A row's length-3 set is 3 of its length-4 set, its length-2 set 2 of those; rewards stay sorted."""
    rows = _rankings(200)
    for r in rows:
        four, three, two = (nested_ranking(r, k, seed=42) for k in (4, 3, 2))
        assert four == r
        assert set(two.responses) < set(three.responses) < set(four.responses)
        for sub in (three, two):
            assert list(sub.rewards) == sorted(sub.rewards, reverse=True)
            assert all(r.rewards[r.responses.index(a)] == w for a, w in zip(sub.responses, sub.rewards))
    # The draws are random: every candidate is dropped from some length-2 set.
    dropped = {j for r in rows for j, a in enumerate(r.responses) if a not in nested_ranking(r, 2, 42).responses}
    assert dropped == {0, 1, 2, 3}
    assert nested_ranking(rows[0], 2, 42) != nested_ranking(rows[0], 2, 7) or nested_ranking(rows[1], 2, 42) != nested_ranking(rows[1], 2, 7)


def test_subset_takes_one_prompt_order_for_every_length():
    rows = _rankings(50)
    subsets = {k: ranking_subset(rows, RankingSubset(name="ranking_subset", num_prompts=20, ranking_length=k), None) for k in (2, 3, 4)}
    ids = [r.id for r in subsets[4]]
    assert ids != [r.id for r in rows[:20]]  # shuffled
    assert all([r.id for r in s] == ids for s in subsets.values())
    # A smaller subset is a prefix of a larger one (nested in N too).
    small = ranking_subset(rows, RankingSubset(name="ranking_subset", num_prompts=10, ranking_length=4), None)
    assert [r.id for r in small] == ids[:10]
    with pytest.raises(ValueError, match="num_prompts 60 is more than the 50 rankings"):
        ranking_subset(rows, RankingSubset(name="ranking_subset", num_prompts=60, ranking_length=2), None)
    with pytest.raises(ValueError, match="ranking_length 5 is more than the 4 candidates"):
        ranking_subset(rows, RankingSubset(name="ranking_subset", num_prompts=5, ranking_length=5), None)


def test_equal_budget_grid_points_train_on_the_same_number_of_answers(doc):
    """(k=2, N), (k=3, 2N/3), (k=4, N/2): one annotation budget N = num_prompts x k / 2, the
    same number of answers in each training set."""
    rows = _rankings(240)
    answers = {}
    for k, n in ((2, 240), (3, 160), (4, 120)):
        subset = ranking_subset(rows, RankingSubset(name="ranking_subset", num_prompts=n, ranking_length=k), None)
        answers[k] = sum(len(r.responses) for r in subset)
        assert n * k / 2 == 240
    assert set(answers.values()) == {480}
    trials = expand(doc, "d.yaml")
    budgets = {(t.axes["stages.policy.data.transforms.0.ranking_length"], t.axes["stages.policy.data.transforms.0.num_prompts"]) for t in trials}
    assert {(2, 240), (3, 160), (4, 120)} <= budgets  # the job's grid holds one equal-budget triple


# ---------------------------------------------------------------- stages naming stages


def test_plan_shares_the_builders_and_keys_each_stage_by_what_it_reads(doc):
    trials = expand(doc, "d.yaml")
    assert len(trials) == 54 and trials[0].id == "objective=pro_ranking_length=2_num_prompts=120_seed=42"
    plans = plan_study(trials)
    first = plans[trials[0].id]
    assert [s.name for s in first.stages] == ["pretrain", "generator", "rank_rm", "judge_rm", "rankings", "policy"]
    assert first.evaluated == "policy" and [r[0] for r in first.eval_refs] == ["judge_rm"]
    stage = {s.name: s for s in first.stages}
    assert stage["rank_rm"].input_key == stage["pretrain"].key  # input: pretrain, not the generator before it
    assert stage["policy"].input_key == stage["generator"].key
    assert stage["generator"].input_key == stage["pretrain"].key
    assert [r[0] for r in stage["rankings"].refs] == ["generator", "rank_rm"]
    assert [r[0] for r in stage["policy"].refs] == ["rankings", "judge_rm"]  # the judge chooses its checkpoint
    for name in ("pretrain", "generator", "rank_rm", "judge_rm", "rankings"):
        assert len(stage[name].users) == 54, name  # built once for the whole grid
    assert len({plans[t.id].stage("policy").key for t in trials}) == 54

    # A change to the ranker changes the rankings and every policy, not the judge.
    changed = copy.deepcopy(doc)
    changed["stages"]["rank_rm"]["lr"] = 2e-3
    other = {s.name: s for s in plan_study(expand(changed, "d.yaml"))[trials[0].id].stages}
    assert other["judge_rm"].key == stage["judge_rm"].key
    assert all(other[n].key != stage[n].key for n in ("rank_rm", "rankings", "policy"))
    # A change to the judge changes the evaluation and the checkpoint it chooses, not what the policy trains on.
    changed = copy.deepcopy(doc)
    changed["stages"]["judge_rm"]["epochs"] = 1
    plan = plan_study(expand(changed, "d.yaml"))[trials[0].id]
    assert plan.stage("rankings").key == stage["rankings"].key
    assert plan.stage("policy").key != stage["policy"].key and plan.eval_key != first.eval_key


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["stages"]["policy"].update(input="judge_rm"), "stages.policy.input: stage 'judge_rm' builds reward model, not a model"),
        (lambda d: d["stages"]["generator"].update(input="policy"), "stages.generator.input: 'policy' is not a stage listed before it"),
        (
            lambda d: d["stages"]["rankings"].update(reward_model="generator"),
            "stages.rankings.reward_model: stage 'generator' builds model, not a reward model",
        ),
        (
            lambda d: d["stages"]["rankings"].update(generator="gen"),
            "stages.rankings.generator: 'gen' is not a stage listed before it that builds a model (those: pretrain, generator) or a hub id",
        ),
        (
            lambda d: d["stages"]["policy"]["data"]["sources"][0].update(stage="judge_rm"),
            "stages.policy.data.sources.0.stage: stage 'judge_rm' builds reward model, not records",
        ),
        (lambda d: d["eval"].pop("reward_model"), "eval.reward_model: the reward_score metric needs a judge"),
        (lambda d: d["eval"].update(reward_model="./no/such/model"), "eval.reward_model: path './no/such/model' does not exist"),
        (lambda d: d["data"]["sources"].append({"name": "stage", "stage": "rankings"}), "data.sources: the study's data is also the eval data"),
        (lambda d: d["stages"]["policy"]["data"]["sources"][0].pop("stage"), "a source with name: stage needs stage"),
    ],
)
def test_a_stage_names_only_earlier_stages_that_build_what_it_needs(doc, edit, message):
    edit(doc)
    with pytest.raises(StudyError) as e:
        expand(doc, "d.yaml")
    assert message in str(e.value)


def test_a_hub_reward_model_needs_no_stage(doc):
    doc["stages"].pop("rank_rm")
    doc["stages"]["rankings"]["reward_model"] = "OpenAssistant/reward-model-deberta-v3-large-v2"
    plan = plan_study(expand(doc, "d.yaml"))
    first = next(iter(plan.values()))
    assert [r[0] for r in first.stage("rankings").refs] == ["generator"]


def test_paper_profile_reads_only_hub_data_and_models():
    trials = load_study(JOB, "paper")
    assert len(trials) == 2 * 3 * 8 * 3
    study = trials[0].study
    assert list(study.stages) == ["generator", "rankings", "policy"]
    assert study.stages["rankings"].reward_model.startswith("OpenAssistant/")
    # The reference's protocol: its judge on dev answers and test answers, the test split evaluated whole,
    # the same 4,000 steps at a constant lr for every N, 112 rankings a step.
    judge = "OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1"
    policy = study.stages["policy"]
    assert policy.select.reward_model == study.eval.reward_model == judge and policy.select.every == 500
    assert study.eval.data.sources[0].split == "test" and study.eval.limit is None
    assert {t.study.stages["policy"].max_steps for t in trials} == {4000} and policy.lr_scheduler == "constant"
    assert policy.batch_size * policy.grad_accum * policy.resources.num_workers == 112
    assert {t.study.stages["policy"].objective for t in trials} == {"pro", "sft"}


# ---------------------------------------------------------------- built records


def test_built_records_round_trip_and_feed_the_next_stage(tmp_path, doc):
    rows = [*_rankings(30, k=4), Comparison("c", "p", "a", "b", label=0.25), Demonstration("d", "p", "r")]
    write_records(tmp_path / "r.jsonl", rows)
    back = read_records(tmp_path / "r.jsonl")
    assert back == rows and back[30].label == 0.25 and isinstance(back[0].responses, tuple)
    study = expand(doc, "d.yaml")[0].study  # pro, k=2, 120 prompts
    policy = study.stages["policy"]
    policy_data = policy.data.model_copy(update={"transforms": [RankingSubset(name="ranking_subset", num_prompts=20, ranking_length=3)]})
    records, audit = training_records(policy_data, 42, "ranking", built={"rankings": back[:30]})
    assert audit["train_rows"] == 30 and len(records) == 20 and all(len(r.responses) == 3 for r in records)
    sft, _ = training_records(policy_data, 42, "demonstration", built={"rankings": back[:30]})
    assert [d.response for d in sft] == [r.responses[0] for r in records]  # SFT trains on each ranking's best answer


# ---------------------------------------------------------------- the whole study


def test_diversity_study_builds_rankings_once_and_reports_reward(tmp_path, write_study, doc):
    """jobs/diversity.yaml, shrunk: the shared stages and the rankings built once for the grid,
    PRO and SFT judged by the held-out reward model, prompt diversity stored with each trial."""
    import pandas as pd

    doc["model"]["config"] = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128}
    doc["data"]["sources"][0]["limit"] = 240
    doc["stages"]["judge_rm"]["data"]["sources"][0]["limit"] = 240
    doc["stages"]["pretrain"].update(max_steps=3, batch_size=8)
    for name in ("generator", "rank_rm", "judge_rm"):
        doc["stages"][name].update(epochs=1, max_steps=3, batch_size=8)
    doc["stages"]["rankings"].update(samples=1, generation={"do_sample": True, "max_new_tokens": 8, "batch_size": 64})
    doc["stages"]["policy"].update(max_steps=3, batch_size=4)
    doc["eval"].update(limit=8, generation={"max_new_tokens": 8})
    doc["grid"] = {
        "stages.policy.objective": ["pro", "sft"],
        "stages.policy.data.transforms.0.ranking_length": [2, 3],
        "stages.policy.data.transforms.0.num_prompts": [30],
        "seed": [1],
    }
    doc["report"]["tables"][0]["where"] = "budget == 30"
    results = tmp_path / "results"
    farm("run", write_study(doc), "--results", results)
    df = pd.read_csv(results / "diversity" / "table.csv").set_index("trial")
    assert (df["status"] == "ok").all() and len(df) == 4
    assert df["reward"].between(0, 100).all() and df["bleu"].between(0, 1).all() and df["sacrebleu"].ge(0).all()
    assert (df["selected_step"] == 3).all()  # every 10 steps and the last: of 3 steps, the last is the only candidate
    # The same 30 prompts at both lengths: one prompt diversity, stored with every trial.
    assert df["prompt_diversity"].nunique() == 1 and df["prompt_diversity"].iloc[0] > 0
    store = results / ".store" / "artifacts"
    for kind in ("pretrain", "reward", "rank"):
        assert len(list(store.glob(f"{kind}-*"))) == {"pretrain": 1, "reward": 2, "rank": 1}[kind]
    rankings = read_records(next(store.glob("rank-*")) / "records.jsonl")
    assert all(len(r.responses) == 3 and list(r.rewards) == sorted(r.rewards, reverse=True) for r in rankings)
    md = (results / "diversity" / "report.md").read_text()
    assert "Reward at equal annotation budget: published" in md and "reward (0-1) against prompt diversity" in md


# ---------------------------------------------------------------- the reference's metrics


def test_bleu_is_the_references_mean_of_nltk_sentence_bleu_on_characters():
    """ScalingAlignment passes strings to NLTK's sentence_bleu, which reads them as characters: a
    two-word answer still has 4-grams to match, where word BLEU would be 0."""
    from nltk.translate.bleu_score import sentence_bleu

    from farm.eval.reward import reference_bleu

    answers, refs = [" the cat sat ", "a dog", ""], ["the cat sat on the mat", "the dog ran", "anything"]
    assert reference_bleu(answers, refs).mean() == pytest.approx(sum(sentence_bleu([r.strip()], a.strip()) for a, r in zip(answers, refs)) / 3)
    assert 0 < reference_bleu(["the cat"], ["the cat sat"]) < 1
    assert sentence_bleu([["the", "cat", "sat"]], ["the", "cat"]) < 1e-100  # on words: no 4-gram at all
    assert reference_bleu(["same text here"], ["same text here"]) == pytest.approx(1.0)


def test_answers_are_cut_at_the_references_stop_markers(doc):
    """The paper profile cuts answers at any of Human:, human:, Assistant:, assistant: (as
    ScalingAlignment's `early_truncation`); the default only at the next HH turn."""
    from farm.schema import GenerationSpec

    paper = load_study(JOB, "paper")[0].study
    assert paper.eval.generation.stop == ["Human:", "human:", "Assistant:", "assistant:"]
    assert paper.stages["policy"].select.reward_model == paper.eval.reward_model  # dev and test judged alike
    assert GenerationSpec().stop == ["\n\nHuman:", "\n\nAssistant:"]


def test_generate_cuts_at_each_stop_marker(monkeypatch):
    """farm.models.generate cuts a decoded answer at the first of `generation.stop`."""
    import torch

    from farm.models import generate, load_tokenizer
    from farm.schema import GenerationSpec

    tok = load_tokenizer("gpt2")
    text = " Sure, here it is. human: and more\n\nHuman: next"

    class Echo:  # a model whose every answer is `text`
        device = torch.device("cpu")

        def eval(self):
            return self

        def generate(self, input_ids, **kwargs):
            new = torch.tensor(tok(text)["input_ids"]).repeat(len(input_ids), 1)
            return torch.cat([input_ids, new], 1)

    out = generate(Echo(), tok, ["\n\nHuman: hi\n\nAssistant:"], GenerationSpec(), 32)
    assert out == ["Sure, here it is. human: and more"]
    out = generate(Echo(), tok, ["\n\nHuman: hi\n\nAssistant:"], GenerationSpec(stop=["Human:", "human:"]), 32)
    assert out == ["Sure, here it is."]
