"""Study B: the SHP/Orca/LIMA/HH sources in their published schemas, sampled and weighted
mixes, and grids that vary the SFT data and the DPO stage independently."""

import copy

import datasets
import pandas as pd
import pytest
import yaml
from conftest import ROOT, farm

from farm.cache import plan_study
from farm.data.prepare import is_heldout, load_split, mix_counts
from farm.data.records import Comparison, Demonstration
from farm.data.sources import load_source
from farm.spec import DataSpec, SourceSpec, StudyError, expand

# Rows in the hub schemas (stanfordnlp/SHP, Open-Orca/OpenOrca); the texts are made up.
SHP_ROWS = [
    {"post_id": "p1", "domain": "askculinary_train", "upvote_ratio": 0.99, "history": "How long do I rest a steak?",
     "c_root_id_A": "a1", "c_root_id_B": "b1", "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": 52, "score_B": 7,
     "human_ref_A": "Five minutes.", "human_ref_B": "Never rest it.", "labels": 1, "seconds_difference": 1.0, "score_ratio": 7.43},
    {"post_id": "p1", "domain": "askculinary_train", "upvote_ratio": 0.99, "history": "How long do I rest a steak?",
     "c_root_id_A": "a2", "c_root_id_B": "b2", "created_at_utc_A": 3, "created_at_utc_B": 4, "score_A": 3, "score_B": 30,
     "human_ref_A": "An hour.", "human_ref_B": "About as long as it cooked.", "labels": 0, "seconds_difference": 1.0, "score_ratio": 10.0},
    {"post_id": "p2", "domain": "askculinary_train", "upvote_ratio": 0.9, "history": "Is MSG safe?",
     "c_root_id_A": "a3", "c_root_id_B": "b3", "created_at_utc_A": 5, "created_at_utc_B": 6, "score_A": 9, "score_B": 4,
     "human_ref_A": "Yes.", "human_ref_B": "  ", "labels": 1, "seconds_difference": 1.0, "score_ratio": 2.25},
]  # fmt: skip
ORCA_ROWS = [
    {"id": "flan.1", "system_prompt": "You are a helpful assistant.", "question": "Translate 'hi' to French.", "response": "Salut."},
    {"id": "niv.2", "system_prompt": "", "question": "2+2?", "response": "4"},
    {"id": "t0.3", "system_prompt": "", "question": "Empty answer", "response": " "},
]


@pytest.fixture
def hub(monkeypatch):
    """The hub path of the sources, served from in-memory rows in the published schemas."""
    tables = {"stanfordnlp/SHP": SHP_ROWS, "Open-Orca/OpenOrca": ORCA_ROWS}
    calls = []

    def load_dataset(path, data_dir=None, split=None):
        calls.append((path, data_dir, split))
        return datasets.Dataset.from_list(tables[path])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_shp_maps_labels_to_chosen_and_keeps_a_posts_pairs_together(hub):
    out = load_source(SourceSpec(name="shp", origin="hub", subset="askculinary"))
    assert hub == [("stanfordnlp/SHP", "askculinary", "train")]
    assert [(c.id, c.chosen, c.rejected) for c in out] == [
        ("shp/train/p1#0", " Five minutes.", " Never rest it."),  # labels 1: A preferred
        ("shp/train/p1#1", " About as long as it cooked.", " An hour."),  # labels 0: B preferred
    ]  # the pair with an empty comment is dropped
    assert out[0].prompt == "\n\nHuman: How long do I rest a steak?\n\nAssistant:"
    # Both pairs of post p1 fall on the same side of every split.
    assert all(is_heldout(out[0].id, h, s) == is_heldout(out[1].id, h, s) for h in (0.3, 0.5, 0.7) for s in range(20))
    load_source(SourceSpec(name="shp", origin="hub"))
    assert hub[-1] == ("stanfordnlp/SHP", None, "train")  # subset all: every domain


def test_orca_puts_the_system_prompt_in_the_human_turn(hub):
    out = load_source(SourceSpec(name="orca", origin="hub"))
    assert out == [
        Demonstration("orca/flan.1", "\n\nHuman: You are a helpful assistant.\n\nTranslate 'hi' to French.\n\nAssistant:", " Salut."),
        Demonstration("orca/niv.2", "\n\nHuman: 2+2?\n\nAssistant:", " 4"),
    ]


def test_hub_only_sources_say_so_and_hh_has_every_subset():
    with pytest.raises(ValueError, match="shp/all has no bundled copy; set origin: hub"):
        SourceSpec(name="shp")
    with pytest.raises(ValueError, match="subset 'askreddit' of shp: allowed: all, askacademia"):
        SourceSpec(name="shp", origin="hub", subset="askreddit")
    for subset in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled", "all"):
        SourceSpec(name="hh_rlhf", origin="hub", subset=subset)


def test_a_sample_is_seeded_and_keeps_record_ids(hub):
    full = load_source(SourceSpec(name="lima"))
    by_id = {r.id: r for r in full}
    a = load_source(SourceSpec(name="lima", sample=100, seed=1))
    assert len(a) == 100 and a == load_source(SourceSpec(name="lima", sample=100, seed=1))
    assert a != load_source(SourceSpec(name="lima", sample=100, seed=2))
    assert all(by_id[r.id] == r for r in a)  # a sampled row keeps the id (and so the split) it has unsampled
    orca = {r.id: r for r in load_source(SourceSpec(name="orca", origin="hub"))}
    for seed in range(5):  # the hub path samples the dataset before reading it
        assert all(orca[r.id] == r for r in load_source(SourceSpec(name="orca", origin="hub", sample=2, seed=seed)))


def test_weighted_mix_gives_each_source_its_share():
    data = DataSpec(sources=[SourceSpec(name="lima", weight=3), SourceSpec(name="hh_rlhf", weight=1)], size=401, holdout=0.1)
    assert mix_counts(data) == [301, 100]
    rows = load_split(data, "train")
    assert len(rows) == 401 and sum(isinstance(r, Demonstration) for r in rows) == 301
    assert rows == load_split(data, "train")
    held_out = {r.id for r in load_split(data, "eval")}
    assert len(held_out) > 250 and not held_out & {r.id for r in rows}  # eval rows: every held-out row, unmixed
    too_big = DataSpec(sources=[SourceSpec(name="lima", weight=1), SourceSpec(name="hh_rlhf")], size=3000)
    with pytest.raises(ValueError, match="source lima has .* training rows, fewer than its share 1500"):
        load_split(too_big, "train")
    with pytest.raises(ValueError, match="a weight needs the data's size"):
        DataSpec(sources=[SourceSpec(name="lima", weight=2)])


CHAIN = {
    "name": "chain",
    "data": {"sources": [{"name": "hh_rlhf"}]},
    "stages": {
        "sft": {"max_steps": 2},
        "dpo": {"max_steps": 2, "beta": 0.1},
    },
    "eval": {"metrics": ["perplexity"]},
    "grid": {
        "stages.sft.data.sources": {"lima": [{"name": "lima"}], "hh": [{"name": "hh_rlhf"}]},
        "stages.dpo": {"none": None, "hh": {"max_steps": 2, "beta": 0.1}, "hh-b0.5": {"max_steps": 2, "beta": 0.5}},
        "seed": [1, 2],
    },
}


def test_grid_varies_sft_data_and_dpo_independently_and_shares_sft_stages():
    trials = expand(copy.deepcopy(CHAIN), "chain.yaml")
    assert len(trials) == 12
    assert trials[0].id == "sft=lima_dpo=none_seed=1"
    assert trials[0].axes == {"stages.sft.data.sources": "lima", "stages.dpo": "none", "seed": 1}
    assert list(trials[0].study.stages) == ["sft"]  # null removed the stage
    assert trials[2].study.stages["dpo"].beta == 0.1 and trials[4].study.stages["dpo"].beta == 0.5
    plan = plan_study(trials)
    sft_keys = {p.stages[0].key for p in plan.values()}
    assert len(sft_keys) == 4  # 2 SFT data x 2 seeds, each shared by the 3 DPO choices
    assert {len(p.stages[0].users) for p in plan.values()} == {3}


def test_grid_labels_must_be_usable_in_ids():
    doc = copy.deepcopy(CHAIN)
    doc["grid"] = {"stages.dpo": {"no dpo": None}}
    with pytest.raises(StudyError, match="grid.stages.dpo: label 'no dpo': use letters"):
        expand(doc, "chain.yaml")
    doc["grid"] = {"stages.sft.data.sources": [[{"name": "lima", "limit": 5}], [{"name": "lima", "limit": 9}]]}
    assert [t.id for t in expand(doc, "chain.yaml")] == ["sft=lima-5", "sft=lima-9"]
    doc["grid"] = {"stages.sft.data.sources": [[{"name": "lima", "sample": 5, "seed": 1}], [{"name": "lima", "sample": 5, "seed": 2}]]}
    assert [t.id for t in expand(doc, "chain.yaml")] == ["sft=lima-5-1", "sft=lima-5-2"]
    doc["grid"] = {"stages.sft.data.sources": [[{"name": "lima", "limit": 5}], [{"name": "lima", "sample": 5}]]}
    with pytest.raises(StudyError, match="two values share the label 'lima-5'; give the axis as a mapping of label -> value"):
        expand(doc, "chain.yaml")


def test_a_chain_axis_with_a_base_row_and_a_profile_that_drops_axes():
    doc = copy.deepcopy(CHAIN)
    doc["profiles"] = {"paper": {"stages": None, "grid": {
        "stages.sft.data.sources": None,
        "stages.dpo": None,
        "stages": {"base": {}, "sft-lima": {"sft": {"data": {"sources": [{"name": "lima"}]}}},
                   "sft-lima+dpo-hh": {"sft": {"data": {"sources": [{"name": "lima"}]}}, "dpo": {"beta": 0.1}}},
    }}}
    trials = expand(doc, "chain.yaml", profile="paper")
    assert [t.id for t in trials][::2] == ["stages=base_seed=1", "stages=sft-lima_seed=1", "stages=sft-lima+dpo-hh_seed=1"]
    assert [list(t.study.stages) for t in trials[::2]] == [[], ["sft"], ["sft", "dpo"]]
    plans = plan_study(trials)
    base = plans["stages=base_seed=1"]
    assert base.stages == () and base.eval_key != plans["stages=base_seed=2"].eval_key  # a built base model depends on the seed


def test_data_impact_runs_its_chains_and_reports_benchmarks_and_safety(tmp_path, write_study):
    """jobs/data_impact.yaml, shrunk (tiny model, a few steps, a few documents): every chain
    runs, the report has the benchmark table beside the published one and the heatmap."""
    doc = yaml.safe_load((ROOT / "jobs" / "data_impact.yaml").read_text())
    tiny = {"max_steps": 2, "batch_size": 4, "max_length": 32, "max_prompt_length": 16}
    doc["model"]["config"] = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}
    doc["stages"]["pretrain"].update(max_steps=2, batch_size=4, max_length=32)
    doc["grid"]["stages.sft"] = {"none": None, "lima": {**doc["grid"]["stages.sft"]["lima"], **tiny}}
    doc["grid"]["stages.dpo"] = {"none": None, "hh": {**doc["grid"]["stages.dpo"]["hh"], **tiny}}
    doc["grid"]["seed"] = [1]
    doc["eval"].update(limit=8, max_length=32, max_prompt_length=16)
    doc["eval"]["benchmarks"].update(limit=2, tasks=["arc_challenge", "piqa", "truthfulqa_mc2"])
    doc["eval"]["safety"] = {"sets": ["toxigen"], "limit": 600}
    farm("run", write_study(doc), "--results", tmp_path)
    out = tmp_path / "data_impact"
    df = pd.read_csv(out / "table.csv").set_index("trial")
    assert sorted(df.index) == ["sft=lima_dpo=hh_seed=1", "sft=lima_dpo=none_seed=1", "sft=none_dpo=hh_seed=1", "sft=none_dpo=none_seed=1"]
    assert (df["status"] == "ok").all()
    for task in ("arc_challenge", "piqa", "truthfulqa_mc2"):
        assert df[f"bench/{task}"].between(0, 1).all()
    assert df["safety_groups_reported"].ge(0).all() and "reward_accuracy" in df
    md = (out / "report.md").read_text()
    assert "## Benchmarks: ours" in md and "## Benchmarks: published" in md and "| Llama-2-7B base |" in md
    assert "## safety score per demographic group (higher is safer)" in md
    assert (out / "plot.png").stat().st_size > 1000
