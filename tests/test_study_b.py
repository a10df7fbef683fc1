"""Study B: the SHP/Orca/LIMA/HH sources in their published schemas, sampled and weighted
mixes, and grids that vary the SFT data and the DPO stage independently."""

import copy

import pandas as pd
import pytest
from conftest import ROOT, farm

from farm.config import StudyError
from farm.data.prepare import load_split, mix_counts
from farm.data.records import Demonstration
from farm.data.sources import SourceSpec, load_source
from farm.grid import expand, read_study
from farm.plan import plan_study
from farm.schema import DataSpec

# Rows in the hub schemas (stanfordnlp/SHP, Open-Orca/OpenOrca); the texts are made up.


def test_hub_only_sources_say_so_and_hh_has_every_subset():
    with pytest.raises(ValueError, match="shp/all has no bundled copy; set origin: hub"):
        SourceSpec(name="shp")
    with pytest.raises(ValueError, match="subset 'askreddit' of shp: allowed: all, askacademia"):
        SourceSpec(name="shp", origin="hub", subset="askreddit")
    for subset in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled", "all"):
        SourceSpec(name="hh_rlhf", origin="hub", subset=subset)


def test_a_sample_is_seeded_and_keeps_record_ids():
    full = load_source(SourceSpec(name="lima"))
    by_id = {r.id: r for r in full}
    a = load_source(SourceSpec(name="lima", sample=100, seed=1))
    assert len(a) == 100 and a == load_source(SourceSpec(name="lima", sample=100, seed=1))
    assert a != load_source(SourceSpec(name="lima", sample=100, seed=2))
    assert all(by_id[r.id] == r for r in a)  # a sampled row keeps the id (and so the split) it has unsampled


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
    doc["profiles"] = {
        "paper": {
            "stages": None,
            "grid": {
                "stages.sft.data.sources": None,
                "stages.dpo": None,
                "stages": {
                    "base": {},
                    "sft-lima": {"sft": {"data": {"sources": [{"name": "lima"}]}}},
                    "sft-lima+dpo-hh": {"sft": {"data": {"sources": [{"name": "lima"}]}}, "dpo": {"beta": 0.1}},
                },
            },
        }
    }
    trials = expand(doc, "chain.yaml", profile="paper")
    assert [t.id for t in trials][::2] == ["stages=base_seed=1", "stages=sft-lima_seed=1", "stages=sft-lima+dpo-hh_seed=1"]
    assert [list(t.study.stages) for t in trials[::2]] == [[], ["sft"], ["sft", "dpo"]]
    plans = plan_study(trials)
    base = plans["stages=base_seed=1"]
    assert base.stages == () and base.eval_key != plans["stages=base_seed=2"].eval_key  # a built base model depends on the seed


def test_data_impact_runs_its_chains_and_reports_benchmarks_and_safety(tmp_path, write_study):
    """jobs/data_impact.yaml, shrunk (tiny model, a few steps, a few documents): every chain
    runs, the report has the benchmark table beside the published one and the heatmap."""
    doc = read_study(ROOT / "jobs" / "data_impact.yaml")  # with what it includes
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
