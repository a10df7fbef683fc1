"""PRO: the loss on hand-computed values and its limiting cases, the collator's masks, the
trainer's loss against a direct per-candidate computation, and the stage run in-process."""

import math

import pytest
import torch
from torch.testing import assert_close

from farm.data.records import Ranking
from farm.stages.pro import RankingCollator, pro_loss, pro_trainer_class


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_pro_loss_k3_one_ranking_by_hand():
    # s = (-1, -2, -3), r = (3, 1, 0).
    # L_1: T = (2, 3), T_1^1 = 3 -> logits (-3, -4, -9): log(e^-3 + e^-4 + e^-9) + 3 = log(1 + e^-1 + e^-6)
    # L_2: T = (1,), T_2^2 = 1 -> logits (-2, -3): log(1 + e^-1)
    # SFT: 0.05 * (3-1)^2 * 10 = 2
    expected = math.log(1 + math.exp(-1) + math.exp(-6)) + math.log(1 + math.exp(-1)) + 2.0
    loss = pro_loss(t([-1.0, -2.0, -3.0]), torch.tensor([-10.0]), t([3.0, 1.0, 0.0]))
    assert_close(loss, torch.tensor(expected))


def test_pro_loss_k3_two_rankings_averages_each_term_over_the_batch():
    # Row 1 as above. Row 2: s = (-0.5, -0.5, -1), r = (1, 1, 0) (a tie: its temperature is 0).
    # L_1: T = (0, 1), T_1^1 = 1 -> logits (-0.5, 0, -1): log(e^-0.5 + 1 + e^-1) + 0.5
    # L_2: T = (1,) -> logits (-0.5, -1): log(1 + e^-0.5)
    # SFT: 0.2 * mean(10, 4) = 1.4
    l1 = (math.log(1 + math.exp(-1) + math.exp(-6)) + math.log(math.exp(-0.5) + 1 + math.exp(-1)) + 0.5) / 2
    l2 = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-0.5))) / 2
    loss = pro_loss(t([-1.0, -2.0, -3.0], [-0.5, -0.5, -1.0]), torch.tensor([-10.0, -4.0]), t([3.0, 1.0, 0.0], [1.0, 1.0, 0.0]))
    assert_close(loss, torch.tensor(l1 + l2 + 1.4))


def test_k1_is_sft_on_the_best_response():
    sums = torch.tensor([-7.0, -3.0])
    assert_close(pro_loss(t([-1.0], [-0.5]), sums, t([2.0], [0.1])), torch.tensor(5.0))
    assert_close(pro_loss(t([-1.0], [-0.5]), sums, t([2.0], [0.1]), sft_weight=0.0), torch.tensor(5.0))


def test_k2_is_a_reward_scaled_logistic_loss_plus_sft():
    s, r, sums = t([-1.2, -0.7], [-2.0, -2.5]), t([0.9, -0.4], [2.0, 0.5]), torch.tensor([-12.0, -20.0])
    logistic = -torch.nn.functional.logsigmoid((s[:, 0] - s[:, 1]) * (r[:, 0] - r[:, 1])).mean()
    assert_close(pro_loss(s, sums, r), logistic + 0.05 * 16.0)


def test_loss_falls_as_the_best_candidate_gains_and_is_stable():
    r, sums = t([3.0, 1.0, 0.0]), torch.tensor([-10.0])
    losses = [pro_loss(t([s1, -2.0, -3.0]), sums, r).item() for s1 in (-3.0, -2.0, -1.0, -0.5)]
    assert losses == sorted(losses, reverse=True)
    big = pro_loss(t([-1.0, -200.0, -300.0]), sums, t([300.0, 1.0, 0.0]))  # exp would underflow
    assert torch.isfinite(big)


def test_gradients_reach_every_score():
    s = t([-1.0, -2.0, -3.0], [-0.5, -0.7, -1.0]).requires_grad_()
    sums = torch.tensor([-10.0, -4.0], requires_grad=True)
    pro_loss(s, sums, t([3.0, 1.0, 0.0], [2.0, 1.0, 0.0])).backward()
    assert (s.grad[:, 0] < 0).all() and (s.grad[:, 1:] != 0).all()  # raising the best lowers the loss
    assert_close(sums.grad, torch.tensor([-0.1, -0.1]))  # 0.05 * 2^2 / B


def test_collator_pads_to_b_k_l_and_masks_responses_only():
    batch = RankingCollator(pad_id=9)(
        [
            {"prompt_ids": [[1, 2], [1, 2]], "response_ids": [[3, 0], [4, 5, 0]], "rewards": [1.0, 0.0]},
            {"prompt_ids": [[6], [6]], "response_ids": [[7, 0], [0]], "rewards": [0.5, 0.2]},
        ]
    )
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["response_mask"].shape == (2, 2, 5)
    assert batch["input_ids"].tolist() == [[[1, 2, 3, 0, 9], [1, 2, 4, 5, 0]], [[6, 7, 0, 9, 9], [6, 0, 9, 9, 9]]]
    assert batch["attention_mask"].tolist() == [[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]]
    assert batch["response_mask"].tolist() == [[[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]]
    assert_close(batch["rewards"], t([1.0, 0.0], [0.5, 0.2]))


@pytest.fixture(scope="module")
def study():
    import yaml
    from conftest import TINY

    from farm.grid import expand

    doc = yaml.safe_load(TINY.read_text())
    doc.pop("grid")
    return expand(doc, "s.yaml")[0].study


def test_trainer_loss_matches_unpadded_per_candidate_log_probs(study, tmp_path):
    from transformers import TrainingArguments

    from farm.models import base_model

    model, tok = base_model(study.model, study.seed)
    model.eval()  # no dropout: both computations see the same network
    examples = [
        {"prompt_ids": [[5, 6, 7]] * 3, "response_ids": [[8, 9, 0], [10, 0], [11, 12, 13, 0]], "rewards": [2.0, 1.0, 0.0]},
        {"prompt_ids": [[14]] * 3, "response_ids": [[15, 0], [16, 17, 18, 19, 0], [0]], "rewards": [1.0, 0.5, -1.0]},
    ]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = pro_trainer_class()(model=model, args=args, data_collator=RankingCollator(tok.pad_token_id))
    loss = trainer.compute_loss(model, RankingCollator(tok.pad_token_id)(examples))

    means, sums = [], []
    with torch.no_grad():
        for e in examples:
            row = []
            for p, r in zip(e["prompt_ids"], e["response_ids"]):
                logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0, :-1], -1)
                row.append(sum(logp[len(p) - 1 + i, tok_id] for i, tok_id in enumerate(r)))
            sums.append(row[0])
            means.append([x / len(r) for x, r in zip(row, e["response_ids"])])
    expected = pro_loss(torch.tensor(means), torch.tensor(sums), torch.tensor([e["rewards"] for e in examples]))
    assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-4)


def rankings(n: int) -> list[Ranking]:
    """Rankings of three from the bundled HH comparisons: chosen, rejected, another prompt's rejected."""
    from farm.data.sources import SourceSpec, load_source

    pairs = load_source(SourceSpec(name="hh_rlhf", limit=n + 1))
    return [Ranking(c.id, c.prompt, (c.chosen, c.rejected, other.rejected), (1.0, 0.0, -1.0)) for c, other in zip(pairs, pairs[1:])]


def run_pro(study, tmp_path, records, **extra):
    from farm.stages.pro import PRO
    from farm.train.base import StageContext

    stage = PRO.model_validate({"kind": "pro", "max_steps": 3, "batch_size": 4, "max_length": 64, "max_prompt_length": 32, "lr": 1e-2, **extra})
    out = tmp_path / "pro"
    out.mkdir(parents=True)
    ctx = StageContext("pro", stage, study.model, study.seed, None, records, out, tmp_path / "work", [])
    return ctx.stage.run(ctx), out


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_stage_trains_and_saves_a_changed_loadable_model(study, tmp_path, lora):
    from farm.models import base_model, load_artifact

    metrics, out = run_pro(study, tmp_path, rankings(16), **({"lora": lora} if lora else {}))
    assert metrics["train_steps"] == 3 and metrics["train_loss"] > 0 and metrics["train_rows"] == 16
    model, tok = load_artifact(out)
    start = base_model(study.model, study.seed)[0].state_dict()
    assert len(tok) == model.config.vocab_size
    assert any(not torch.equal(w, start[name]) for name, w in model.state_dict().items())
    assert (out / "adapter" / "adapter_config.json").exists() == bool(lora)


def test_stage_refuses_rankings_of_mixed_lengths(study, tmp_path):
    records = rankings(2)
    records[1] = Ranking("x", records[1].prompt, records[1].responses[:2], records[1].rewards[:2])
    with pytest.raises(ValueError, match="one length"):
        run_pro(study, tmp_path, records)


def test_objective_sft_is_pro_on_the_best_answer_alone(study, tmp_path):
    """ScalingAlignment's SFT baseline: PRO at k = 1 on the length-k data, i.e. the summed NLL of
    each ranking's best answer; the same weights as PRO on rankings cut to their best answer."""
    from farm.models import load_artifact

    records = rankings(12)
    sft, out_sft = run_pro(study, tmp_path / "a", records, objective="sft")
    best = [Ranking(r.id, r.prompt, r.responses[:1], r.rewards[:1]) for r in records]
    k1, out_k1 = run_pro(study, tmp_path / "b", best)
    pro, out_pro = run_pro(study, tmp_path / "c", records)
    assert sft["train_loss"] == pytest.approx(k1["train_loss"]) and sft["train_loss"] != pytest.approx(pro["train_loss"])
    a, b = load_artifact(out_sft)[0].state_dict(), load_artifact(out_k1)[0].state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
