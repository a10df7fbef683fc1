"""The `kto` stage (TRL KTOTrainer): comparisons unpaired into desirable and undesirable answers
in a seeded order, TRL's KL pairing built as TRL builds it, and the stage trained in-process on a
tiny model (no Ray), with a frozen copy or a LoRA adapter as its reference."""

import pytest
import torch
import yaml
from conftest import TINY

from farm.config import StudyError
from farm.data.prepare import training_records
from farm.eval.runner import evaluate
from farm.grid import expand
from farm.models import load_artifact
from farm.stages.kto import unpaired
from farm.train.base import StageContext


def test_unpaired_gives_each_answer_its_label_in_a_seeded_order_with_the_kl_answers_rotated_per_batch():
    cols = {"prompt_ids": [[1], [2], [3]], "chosen_ids": [[10], [20], [30]], "rejected_ids": [[11], [21], [31]]}
    out = unpaired(cols, batch_size=4, seed=7, kl=True)
    assert sorted(zip(map(tuple, out["prompt_ids"]), map(tuple, out["completion_ids"]), out["label"])) == [
        ((1,), (10,), True), ((1,), (11,), False), ((2,), (20,), True), ((2,), (21,), False), ((3,), (30,), True), ((3,), (31,), False)
    ]  # fmt: skip
    assert out == unpaired(cols, batch_size=4, seed=7, kl=True) and out["label"] != unpaired(cols, 4, seed=8, kl=True)["label"]
    answers, kl = out["completion_ids"], out["KL_completion_ids"]
    assert kl[:4] == [answers[3], *answers[:3]] and kl[4:] == [answers[5], answers[4]]  # within each batch of 4, by one
    assert "KL_completion_ids" not in unpaired(cols, 4, seed=7, kl=False)


def test_kto_with_a_one_row_batch_is_refused_naming_the_fix(tiny_doc):
    tiny_doc["stages"]["dpo"] = {"kind": "kto", "batch_size": 1, "max_steps": 2}
    with pytest.raises(StudyError, match=r"stages\.dpo.*batch_size: loss_type kto estimates its KL term .* apo_zero_unpaired"):
        expand(tiny_doc, "s.yaml")
    tiny_doc["stages"]["dpo"]["loss_type"] = "apo_zero_unpaired"
    assert expand(tiny_doc, "s.yaml")


@pytest.mark.parametrize("kto", [
    {"loss_type": "kto", "lr": 5e-3},  # reference: a frozen copy of the SFT model
    {"loss_type": "apo_zero_unpaired", "lr": 5e-3, "lora": {"r": 4, "alpha": 8}, "desirable_weight": 1.5},  # the adapter disabled
])  # fmt: skip
def test_a_kto_stage_trains_saves_and_moves_away_from_its_reference(tmp_path, kto):
    doc = yaml.safe_load(TINY.read_text())
    doc.pop("grid")
    doc["stages"].pop("dpo")
    doc["stages"]["kto"] = {"max_steps": 4, "batch_size": 4, "max_length": 32, "max_prompt_length": 16, **kto}
    study = expand(doc, "s.yaml")[0].study
    previous = None
    for name, stage in study.stages.items():
        records, _ = training_records(stage.data or study.data, study.seed, stage.shape)
        out = tmp_path / f"{stage.kind}-{name}"
        out.mkdir()
        ctx = StageContext(name, stage, study.model, study.seed, previous, records, out, tmp_path / f"work-{name}", [])
        metrics = ctx.stage.run(ctx)
        assert metrics["train_steps"] == stage.max_steps and torch.isfinite(torch.tensor(metrics["train_loss"]))
        sft, previous = previous, out
    assert load_artifact(previous)[0] is not None
    m = evaluate(study, previous, sft, study.seed)
    assert m["reward_margin"] != 0  # the implicit reward log pi/pi_ref: the policy is not its reference
