import copy

import pytest
from conftest import QUICKSTART

from farm.grid import expand, load_study
from farm.plan import plan_study, plan_trial
from farm.store import MARKER, Store
from farm.tune import stage_groups


def study_of(doc):
    return expand(doc, "s.yaml")[0].study


def test_keys_are_stable_and_follow_config_and_inputs(tiny_doc):
    tiny_doc.pop("grid")
    base = plan_trial(study_of(tiny_doc))
    assert plan_trial(study_of(copy.deepcopy(tiny_doc))) == base
    changed = copy.deepcopy(tiny_doc)
    changed["stages"]["sft"]["lr"] = 0.5
    plan = plan_trial(study_of(changed))
    pre, sft, dpo = plan.stages
    assert pre.key == base.stages[0].key  # upstream of the change: shared
    assert sft.key != base.stages[1].key and dpo.key != base.stages[2].key  # the change and everything after it
    assert plan.eval_key != base.eval_key
    assert dpo.input_key == sft.key and dpo.input_kind == "sft" and pre.input_key is None


def test_eval_key_ignores_training_perturbations_but_not_the_model(tiny_doc):
    a, b = expand(tiny_doc, "s.yaml")  # label_flip rate 0 vs 1
    pa, pb = plan_trial(a.study), plan_trial(b.study)
    assert pa.stages[0].key == pb.stages[0].key  # pretrain reads no perturbed data
    assert pa.stages[1].key != pb.stages[1].key and pa.eval_key != pb.eval_key


def test_quickstart_shares_one_pretrain_and_groups_the_rest():
    trials = load_study(QUICKSTART)
    plans = plan_study(trials)
    pretrain_keys = {plans[t.id].stages[0].key for t in trials}
    assert len(pretrain_keys) == 1 and len(plans[trials[0].id].stages[0].users) == 4
    assert len({s.key for p in plans.values() for s in p.stages}) == 1 + 4 + 4
    groups = stage_groups(plans[trials[0].id], trials[0].study)
    assert [[s.name for s in g] for g in groups] == [["pretrain"], ["sft", "dpo"]]


def test_store_publishes_only_complete_artifacts(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writing("sft", "k1", {}) as out:
            (out / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed while writing")
    assert not store.done("sft", "k1") and not store.path("sft", "k1").exists()
    assert not list((tmp_path / "artifacts").iterdir())  # no temporary leftovers either

    record = {"stage": "sft"}
    with store.writing("sft", "k1", record) as out:
        (out / "weights.bin").write_bytes(b"full")
        record["metrics"] = {"train_loss": 1.0}
    assert store.done("sft", "k1")
    assert store.marker("sft", "k1")["metrics"] == {"train_loss": 1.0}
    assert (store.path("sft", "k1") / "weights.bin").read_bytes() == b"full"


def test_store_ignores_a_folder_without_its_marker(tmp_path):
    store = Store(tmp_path)
    leftover = store.path("dpo", "k2")
    leftover.mkdir(parents=True)
    (leftover / "weights.bin").write_bytes(b"?")
    assert not store.done("dpo", "k2")
    with store.writing("dpo", "k2", {}) as out:
        (out / "weights.bin").write_bytes(b"new")
    assert store.done("dpo", "k2") and (leftover / "weights.bin").read_bytes() == b"new"
    (leftover / MARKER).write_text('{"key": "other"}')
    assert not store.done("dpo", "k2")


def test_a_transform_at_rate_zero_does_not_split_the_cache(tiny_doc):
    tiny_doc.pop("grid")
    tiny_doc["stages"].pop("dpo")

    def sft_key(transforms):
        tiny_doc["data"]["transforms"] = transforms
        return plan_trial(study_of(tiny_doc)).stages[1].key

    none = sft_key([])
    assert sft_key([{"name": "label_flip", "rate": 0.0}]) == none
    assert sft_key([{"name": "malign_prompts", "mode": "shuffle", "rate": 0.0}]) == none
    flip = sft_key([{"name": "label_flip", "rate": 0.5}])
    assert flip != none
    # A kept transform's position seeds its draws, so a no-op before it still matters.
    assert sft_key([{"name": "malign_labels", "rate": 0.0}, {"name": "label_flip", "rate": 0.5}]) != flip


def test_grid_over_whole_transforms_then_their_rate(tiny_doc):
    tiny_doc["grid"] = {
        "data.transforms.0.rate": [0.0, 0.5],  # listed first, but applied after the shallower path below
        "data.transforms.0": [{"name": "malign_labels"}, {"name": "malign_prompts", "mode": "trigger"}],
    }
    trials = expand(tiny_doc, "s.yaml")
    assert [t.id for t in trials] == [
        "rate=0.0_transforms=malign-labels",
        "rate=0.0_transforms=malign-prompts-trigger",
        "rate=0.5_transforms=malign-labels",
        "rate=0.5_transforms=malign-prompts-trigger",
    ]
    assert trials[3].study.data.transforms[0].mode == "trigger" and trials[3].study.data.transforms[0].rate == 0.5
    plans = plan_study(trials)
    assert plans[trials[0].id].stages[1].key == plans[trials[1].id].stages[1].key  # both no-ops: one SFT
    assert len(plans[trials[0].id].stages[1].users) == 2
