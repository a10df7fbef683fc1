import numpy as np
import pytest

from farm.data.prepare import eval_records, is_heldout, load_split, training_records, transform_rng
from farm.data.records import Comparison, Demonstration, Text, convert
from farm.data.sources import SourceSpec, hh_rows_to_comparisons, load_source, split_hh_transcript
from farm.data.transforms import label_flip
from farm.grid import expand
from farm.schema import DataSpec, LabelFlip


def test_hh_transcript_splits_at_the_last_assistant_turn():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks"
    prompt, response = split_hh_transcript(text)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert response == " fine, thanks"


def test_hh_rows_drop_pairs_without_a_shared_prompt_or_with_equal_answers():
    rows = [
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
        {"chosen": "\n\nHuman: q1\n\nAssistant: a", "rejected": "\n\nHuman: q2\n\nAssistant: b"},
    ]
    out = hh_rows_to_comparisons(rows, "hh")
    assert out == [Comparison("hh/0", "\n\nHuman: q\n\nAssistant:", " good", " bad")]


def test_bundled_sources_load():
    hh = load_source(SourceSpec(name="hh_rlhf"))
    assert 1900 < len(hh) <= 1950 and all(isinstance(r, Comparison) for r in hh)
    assert hh[0].id == "hh_rlhf/harmless-base/test/0" and hh[0].prompt.endswith("\n\nAssistant:")
    lima = load_source(SourceSpec(name="lima"))
    assert len(lima) == 1029 and all(isinstance(r, Demonstration) and r.response.strip() for r in lima)
    multi = [r for r in lima if r.prompt.count("\n\nHuman:") > 1]
    assert len(multi) == 29  # the multi-turn conversations keep their history
    assert len(load_source(SourceSpec(name="lima", limit=5))) == 5


def test_shapes_convert_down_not_up():
    c = Comparison("c", "p", " yes", " no")
    assert convert([c], "demonstration") == [Demonstration("c", "p", " yes")]
    assert convert([c], "text") == [Text("c", "p yes")]
    with pytest.raises(ValueError, match="cannot be used as comparison"):
        convert([Demonstration("d", "p", "r")], "comparison")


def test_holdout_is_per_row_and_independent_of_mixing():
    hh_only = DataSpec(sources=[SourceSpec(name="hh_rlhf")], holdout=0.2)
    mixed = DataSpec(sources=[SourceSpec(name="lima"), SourceSpec(name="hh_rlhf")], holdout=0.2)
    ev = {r.id for r in load_split(hh_only, "eval")}
    train_mixed = {r.id for r in load_split(mixed, "train")}
    assert not ev & train_mixed  # the held-out HH rows stay held out when LIMA is mixed in
    n = len(load_source(SourceSpec(name="hh_rlhf")))
    assert abs(len(ev) / n - 0.2) < 0.04
    other_seed = DataSpec(sources=[SourceSpec(name="hh_rlhf")], holdout=0.2, split_seed=1)
    assert {r.id for r in load_split(other_seed, "eval")} != ev
    assert is_heldout("x", 0.0, 0) is False


def pairs(n):
    return [Comparison(f"r{i}", f"p{i}", f"c{i}", f"r{i}") for i in range(n)]


def test_label_flip_is_seeded_and_hits_its_rate():
    records = pairs(4000)
    a = label_flip(records, LabelFlip(name="label_flip", rate=0.25), np.random.default_rng(1))
    b = label_flip(records, LabelFlip(name="label_flip", rate=0.25), np.random.default_rng(1))
    c = label_flip(records, LabelFlip(name="label_flip", rate=0.25), np.random.default_rng(2))
    assert a == b and a != c
    flipped = [r for r in a if r.meta.get("perturbed") == "label_flip"]
    assert abs(len(flipped) / 4000 - 0.25) < 0.03
    assert all(r.chosen.startswith("r") and r.rejected.startswith("c") and r.label == 0.0 for r in flipped)
    assert label_flip(records, LabelFlip(name="label_flip", rate=0.0), np.random.default_rng(1)) == records
    assert all(r.meta.get("perturbed") for r in label_flip(records, LabelFlip(name="label_flip", rate=1.0), np.random.default_rng(1)))


def test_label_flip_rates_nest_under_one_seed():
    records = pairs(500)

    def ids(rate):
        out = label_flip(records, LabelFlip(name="label_flip", rate=rate), transform_rng(42, "label_flip", 0))
        return {r.id for r in out if r.meta.get("perturbed")}

    assert ids(0.1) < ids(0.25) < ids(0.5)


def test_training_records_perturb_train_rows_only_and_audit_them(tiny_doc):
    tiny_doc.pop("grid")
    tiny_doc["data"]["transforms"][0]["rate"] = 0.5
    study = expand(tiny_doc, "s.yaml")[0].study
    records, audit = training_records(study.data, 7, "comparison")
    assert audit["train_rows"] == len(records) and audit["perturbed_rows"] == len(audit["perturbed_ids"]) > 0
    assert {r.id for r in records if r.meta.get("perturbed")} == set(audit["perturbed_ids"])
    again, audit2 = training_records(study.data, 7, "comparison")
    assert again == records and audit2 == audit
    held_out = eval_records(study, "comparison")
    assert held_out and not any(r.meta.get("perturbed") for r in held_out)
    assert not {r.id for r in held_out} & {r.id for r in records}
