"""The `rl` stage run in-process (no Ray) on the tiny study's prompts: GRPO and RLOO train and save,
the KL reference is a frozen copy of the input model, the same seed gives the same weights, and
a reward for short answers makes answers shorter (one for long answers, longer)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import farm.stages.rl as rl
from farm.data.prepare import training_records
from farm.grid import expand
from farm.models import base_model, encode_pair, load_artifact, load_reward_model, reward_scores
from farm.stages.reward import as_reward_model
from farm.stages.rl import RL
from farm.train.base import StageContext

CUT = dict(max_length=32, max_prompt_length=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(study, demonstration records, root): root/rm is a reward model (the base model with a seeded
    head), root/policy the base model saved as an input artifact."""
    import yaml
    from conftest import TINY

    doc = yaml.safe_load(TINY.read_text())
    doc.pop("grid")
    study = expand(doc, "s.yaml")[0].study
    records, _ = training_records(study.data, study.seed, "demonstration")
    root = tmp_path_factory.mktemp("rl")
    lm, tok = base_model(study.model, study.seed)
    for name, model in (("rm", as_reward_model(lm, tok, study.seed)), ("sft-policy", lm)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return study, records, root


def spec(root, **fields) -> RL:
    fields = {
        "kind": "rl",
        "reward_model": str(root / "rm"),
        "max_steps": 2,
        "batch_size": 4,
        "num_generations": 2,
        "max_new_tokens": 8,
        "lr": 1e-3,
        **CUT,
        **fields,
    }
    return RL.model_validate(fields)


def run_stage(setup, out_name, input_path=None, **fields):
    study, records, root = setup
    s = spec(root, **fields)
    out = root / out_name
    out.mkdir()
    ctx = StageContext("rl", s, study.model, study.seed, input_path, records, out, root / f"work-{out_name}", [])
    metrics = ctx.stage.run(ctx)
    assert metrics["train_steps"] == s.max_steps and metrics["train_rows"] == len(records)
    return metrics, out


def weights(path) -> dict:
    return load_artifact(path)[0].state_dict()


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def grpo(setup, request):
    """GRPO, full fine-tune from the base model (no input artifact), beta > 0; keeps the trainer."""
    trainers = []
    real = rl.train_and_save

    def keep(trainer, ctx, tok):
        trainers.append(trainer)
        return real(trainer, ctx, tok)

    mp = pytest.MonkeyPatch()
    mp.setattr(rl, "train_and_save", keep)
    try:
        metrics, out = run_stage(setup, "grpo", beta=0.1)
    finally:
        mp.undo()
    return metrics, out, trainers[0]


def test_importing_the_stage_is_light():
    code = "import sys, farm.stages.rl; print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_grpo_trains_and_saves_a_model_that_differs_from_its_input(setup, grpo):
    study, _, root = setup
    metrics, out, _ = grpo
    model, tok = load_artifact(out)
    assert model.config.n_embd == 32 and len(tok) == model.config.vocab_size
    assert not (out / "adapter").exists()
    assert differs(model.state_dict(), weights(root / "sft-policy"))  # the base model == root/policy
    assert np.isfinite([metrics["reward_first"], metrics["reward_last"]]).all()


def test_grpo_reference_is_a_frozen_copy_of_the_input_model(setup, grpo):
    _, _, root = setup
    _, out, trainer = grpo
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert trainer.beta == 0.1 and ref is not trainer.accelerator.unwrap_model(trainer.model)
    base = weights(root / "sft-policy")
    assert not differs(ref.state_dict(), base)  # still the input model after training
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_same_seed_gives_the_same_weights(setup, grpo):
    _, out, _ = grpo
    _, again = run_stage(setup, "grpo-again", beta=0.1)
    assert not differs(weights(out), weights(again))


def test_rloo_with_lora_from_an_artifact_saves_its_adapter(setup):
    _, _, root = setup
    metrics, out = run_stage(setup, "rloo", input_path=root / "sft-policy", algorithm="rloo", lr=1e-2, lora={"r": 4, "alpha": 8})
    assert (out / "adapter" / "adapter_config.json").exists()
    assert differs(weights(out), weights(root / "sft-policy"))
    assert "reward_first" in metrics


def test_reward_function_scores_as_reward_models_are_judged(setup):
    study, records, root = setup
    s = spec(root, reward_model="my_rm")  # a reward stage of the study, found through ctx.inputs
    reward, _ = rl.reward_function(StageContext("rl", s, study.model, study.seed, None, records, None, None, [], inputs={"my_rm": root / "rm"}))
    assert reward.__name__ == "reward"
    prompts, answers = [r.prompt for r in records[:5]], [r.response for r in records[:5]]
    expected = reward_scores(*load_reward_model(root / "rm"), prompts, answers, 4, **CUT)
    assert reward(prompts=prompts, completions=answers, completion_ids=[[]] * 5) == pytest.approx(expected.tolist(), abs=1e-6)


def test_incompatible_batch_is_refused_naming_the_fields(setup):
    study, records, root = setup
    ctx = StageContext("rl", spec(root, batch_size=3), study.model, study.seed, None, records, None, None, [])
    with pytest.raises(ValueError, match="batch_size x resources.num_workers x grad_accum .* num_generations = 2"):
        ctx.stage.run(ctx)
    few = StageContext("rl", spec(root, batch_size=8), study.model, study.seed, None, records[:3], None, None, [])
    with pytest.raises(ValueError, match="3 prompts, but each step needs 4"):
        few.stage.run(few)


def eos_probability(path, records) -> float:
    """Mean probability that the answer ends at once (EOS next), over the first 16 prompts."""
    model, tok = load_artifact(path)
    total = 0.0
    for r in records[:16]:
        ids = encode_pair(tok, r.prompt, "", CUT["max_length"], CUT["max_prompt_length"])[0]
        with torch.no_grad():
            total += torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1)[tok.eos_token_id].item()
    return total / 16


@pytest.fixture(scope="module")
def eos_policy(setup):
    """The base model made to end about one answer token in ten, so answer lengths vary from the start."""
    study, _, root = setup
    model, tok = load_artifact(root / "sft-policy")
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 6.0  # every final hidden state gets a constant first component ...
        model.transformer.wte.weight[tok.eos_token_id] = 0.0
        model.transformer.wte.weight[tok.eos_token_id, 0] = 1.0  # ... that only EOS reads (logit ~6)
    model.save_pretrained(root / "eos-policy")
    tok.save_pretrained(root / "eos-policy")
    return root / "eos-policy"


@pytest.mark.parametrize("sign", [1, -1], ids=["short", "long"])
def test_reward_moves_answer_length(setup, eos_policy, monkeypatch, sign):
    def length_reward(model, tok, prompts, responses, *args, **kw):  # short (sign 1) or long answers win
        return -sign * np.array([len(tok(r, add_special_tokens=False)["input_ids"]) for r in responses], dtype=float)

    monkeypatch.setattr("farm.stages.rl.reward_scores", length_reward)
    _, records, _ = setup
    before = eos_probability(eos_policy, records)
    assert 0.03 < before < 0.3, before
    _, out = run_stage(setup, f"length{sign}", input_path=eos_policy, max_steps=4, batch_size=8, num_generations=4, lr=1e-2)
    after = eos_probability(out, records)
    # Seen with study seeds 1-3 after 3 steps: 0.06-0.17 -> 0.84-0.96 (short) or 0.003-0.05 (long).
    assert (after > 0.5) if sign > 0 else (after < before / 2), (before, after)
