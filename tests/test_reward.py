"""The `reward` stage: the soft-label loss by hand, and whole runs in-process (no Ray) on the
tiny study's HH pairs: it learns the pairs, reproducibly, follows soft labels, and saves with LoRA."""

import dataclasses

import numpy as np
import pytest
import torch

from farm.data.prepare import training_records
from farm.grid import expand
from farm.models import base_model, load_reward_model, reward_scores
from farm.stages.reward import Reward, as_reward_model, soft_reward_loss
from farm.train.base import StageContext

CUT = dict(max_length=64, max_prompt_length=32)


def test_soft_loss_by_hand():
    d = torch.tensor([0.0, 1.0, -1.0])  # -log s(1) = log(1 + e^-1) = 0.313262; -log s(-1) = 1.313262
    zero, r = torch.zeros(3), lambda p: soft_reward_loss(d, zero, torch.full((3,), p)).item()
    assert r(1.0) == pytest.approx((0.693147 + 0.313262 + 1.313262) / 3, abs=1e-5)
    assert r(1.0) == pytest.approx(-torch.nn.functional.logsigmoid(d).mean().item(), abs=1e-7)  # TRL's loss
    assert r(0.5) == pytest.approx((0.693147 + 0.813262 + 0.813262) / 3, abs=1e-5)  # the same for d and -d
    assert r(0.0) == pytest.approx((0.693147 + 1.313262 + 0.313262) / 3, abs=1e-5)  # rejected preferred
    one = torch.ones(1)
    assert soft_reward_loss(one, 0 * one, 0 * one).item() == pytest.approx(1.313262, abs=1e-5)
    assert soft_reward_loss(0 * one, one, 0 * one).item() == pytest.approx(0.313262, abs=1e-5)


@pytest.fixture(scope="module")
def study():
    import yaml
    from conftest import TINY

    doc = yaml.safe_load(TINY.read_text())
    doc.pop("grid")
    study = expand(doc, "s.yaml")[0].study
    return study, training_records(study.data, study.seed, "comparison")[0]


def run_stage(study, records, out, input_path=None, **fields):
    s = Reward.model_validate({"kind": "reward", "max_steps": 32, "batch_size": 8, "lr": 3e-3, **CUT, **fields})
    out.mkdir()
    ctx = StageContext("reward", s, study.model, study.seed, input_path, records, out, out.parent / f"work-{out.name}", [])
    metrics = ctx.stage.run(ctx)
    assert metrics["train_steps"] == 32 and metrics["train_rows"] == len(records)
    return metrics


def chosen_wins(model, tok, records):
    prompts = [r.prompt for r in records]
    chosen = reward_scores(model, tok, prompts, [r.chosen for r in records], 32, **CUT)
    rejected = reward_scores(model, tok, prompts, [r.rejected for r in records], 32, **CUT)
    return float((chosen > rejected).mean()), chosen


@pytest.fixture(scope="module")
def trained(study, tmp_path_factory):
    study, records = study
    root = tmp_path_factory.mktemp("reward")
    metrics = run_stage(study, records, root / "a")
    return metrics, load_reward_model(root / "a"), root


def test_reward_model_learns_its_training_pairs(study, trained):
    study, records = study
    metrics, (model, tok), _ = trained
    assert model.config.architectures == ["GPT2ForSequenceClassification"] and model.config.num_labels == 1
    lm, lm_tok = base_model(study.model, study.seed)
    before, _ = chosen_wins(as_reward_model(lm, lm_tok, study.seed).eval(), lm_tok, records)
    after, _ = chosen_wins(model, tok, records)
    assert after > max(before, 0.5) + 0.2, (before, after)
    assert metrics["train_accuracy"] > 0.5


def test_same_seed_gives_the_same_scores(study, trained):
    study, records = study
    _, (model, tok), root = trained
    run_stage(study, records, root / "again")
    assert np.array_equal(chosen_wins(model, tok, records)[1], chosen_wins(*load_reward_model(root / "again"), records)[1])


def test_soft_labels_of_zero_teach_the_reverse(study, tmp_path):
    study, records = study
    run_stage(study, [dataclasses.replace(r, label=0.0) for r in records], tmp_path / "rev")
    share, _ = chosen_wins(*load_reward_model(tmp_path / "rev"), records)
    assert share < 0.3, share


def test_lora_from_an_artifact_trains_and_saves_the_head(study, tmp_path):
    study, records = study
    lm, tok = base_model(study.model, study.seed)
    lm.save_pretrained(tmp_path / "pretrain-lm")
    tok.save_pretrained(tmp_path / "pretrain-lm")
    run_stage(study, records, tmp_path / "lora", input_path=tmp_path / "pretrain-lm", lora={"r": 4, "alpha": 8})
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    model, rtok = load_reward_model(tmp_path / "lora")
    untrained = as_reward_model(lm, tok, study.seed)
    assert model.config.num_labels == 1 and not torch.equal(model.score.weight, untrained.score.weight)
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, untrained.transformer.h[0].attn.c_attn.weight)
    assert chosen_wins(model, rtok, records)[0] > 0.6


def test_trainer_carries_soft_labels_into_its_loss(study, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from farm.stages.reward import _trainer_cls

    study, _ = study
    lm, tok = base_model(study.model, study.seed)
    trainer_cls, collator_cls = _trainer_cls()
    rows = {"chosen_ids": [[5, 6, 7, 0], [8, 9, 0]], "rejected_ids": [[5, 6, 0], [8, 10, 11, 12, 0]], "soft_label": [1.0, 1.0]}
    args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2, max_length=8)
    trainer = trainer_cls(
        model=as_reward_model(lm, tok, 0),
        args=args,
        data_collator=collator_cls(pad_token_id=tok.pad_token_id),
        train_dataset=Dataset.from_dict(rows),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))  # the Trainer keeps the soft_label column
    assert batch["soft_label"].tolist() == [1.0, 1.0]
    hard = RewardTrainer.compute_loss(trainer, trainer.model, {k: v for k, v in batch.items() if k != "soft_label"})
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(hard.item(), abs=1e-6)
    swapped = {"input_ids": torch.cat(batch["input_ids"].chunk(2)[::-1]), "attention_mask": torch.cat(batch["attention_mask"].chunk(2)[::-1])}
    flipped = RewardTrainer.compute_loss(trainer, trainer.model, swapped)
    assert trainer.compute_loss(trainer.model, {**batch, "soft_label": torch.zeros(2)}).item() == pytest.approx(flipped.item(), abs=1e-6)
