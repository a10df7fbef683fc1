"""`farm plan`'s cost estimate: model sizes from names and configs, tokens per stage by hand,
the GPU-hours formula, and the table the command prints for a paper profile, offline."""

import json

import pytest
from conftest import ROOT, farm

from farm.estimate import Rates, config_params, estimate_study, gpu_hours, model_params
from farm.grid import expand
from farm.models import ModelSpec
from farm.plan import plan_study


@pytest.mark.parametrize(
    "name, params",
    [
        ("meta-llama/Llama-2-7b-chat-hf", 7e9),
        ("facebook/opt-1.3b", 1.3e9),
        ("facebook/opt-125m", 125e6),
        ("EleutherAI/pythia-6.9b", 6.9e9),
        ("EleutherAI/pythia-70m-deduped", 70e6),
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.5e9),
        ("gpt2", 124e6),
        ("gpt2-medium", 355e6),
        ("gpt2-large", 774e6),
        ("gpt2-xl", 1.5e9),
        ("distilgpt2", 82e6),
        ("OpenAssistant/reward-model-deberta-v3-large-v2", 435e6),
        # Unknown, not guessed: a mixture of experts, a size with a suffix, a name without a size.
        ("mistralai/Mixtral-8x7B-v0.1", None),
        ("bigscience/bloom-7b1", None),
        ("someone/my-chat-model", None),
    ],
)
def test_parameters_from_hub_names(name, params):
    assert model_params(name) == params


def test_parameters_of_built_models_and_local_configs(tmp_path):
    # tiny-gpt2 (2 layers, 128 wide, 256 positions, farm-bpe's 4096 tokens), by hand: attention
    # 4 x 128^2 and MLP 2 x 128 x 512 per layer, tied embeddings 4096 x 128, positions 256 x 128.
    # The built GPT2LMHeadModel has 953,856: biases and layer norms are left out.
    assert model_params(ModelSpec()) == 2 * (4 * 128**2 + 2 * 128 * 512) + 4096 * 128 + 256 * 128 == 950_272
    small = ModelSpec(base="tiny-gpt2", tokenizer="gpt2", config={"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024})
    assert model_params(small) == pytest.approx(124e6, rel=0.01)  # GPT-2 small
    assert model_params(ModelSpec(base="tiny-gpt2", tokenizer="someone/tokenizer")) is None  # vocabulary unknown
    # A local folder: its config.json (Llama-2-7B's: gated MLP, untied head; 6.74B parameters).
    llama = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(llama))
    assert model_params(str(tmp_path)) == pytest.approx(6.74e9, rel=0.005)
    # Grouped key-value heads (8 of 32) shrink the attention: Llama-3-8B's 8.03B.
    assert config_params({**llama, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}) == pytest.approx(8.03e9, rel=0.005)


def test_gpu_hours_by_hand():
    rates = Rates(throughput=1000, params=7e9, gen_throughput=500)
    # 3.6M tokens at 1,000 tokens/s is one hour with LoRA; full fine-tuning 1.5x, forward-only 0.5x.
    assert gpu_hours([("lora", 3.6e6, 7e9)], rates) == pytest.approx(1.0)
    assert gpu_hours([("full", 3.6e6, 7e9)], rates) == pytest.approx(1.5)
    assert gpu_hours([("forward", 3.6e6, 7e9)], rates) == pytest.approx(0.5)
    assert gpu_hours([("generate", 3.6e6, 7e9)], rates) == pytest.approx(2.0)  # at 500 generated tokens/s
    # Inversely with model size: a model 5x smaller runs 5x as fast, a 2x larger one at half speed.
    assert gpu_hours([("lora", 3.6e6, 1.4e9)], rates) == pytest.approx(0.2)
    assert gpu_hours([("lora", 3.6e6, 14e9), ("generate", 3.6e6, 14e9)], rates) == pytest.approx(2 + 4)
    assert gpu_hours([("lora", 3.6e6, 7e9), ("forward", 1.0, None)], rates) is None  # a model of unknown size


def _study(stages: dict, base: str = "meta-llama/Llama-2-7b-hf") -> list:
    doc = {
        "name": "s",
        "model": {"base": base},
        "data": {"sources": [{"name": "hh_rlhf", "origin": "hub", "subset": "harmless-base", "sample": 1000}], "holdout": 0.1},
        "stages": stages,
    }
    return expand(doc, "s.yaml")


def test_tokens_and_hours_per_stage_by_hand():
    gpu = {"resources": {"gpus_per_worker": 1}}
    trials = _study(
        {
            # 1,000 sampled rows, 0.1 held out: 900 rows x 2 epochs x 512 tokens, LoRA.
            "sft": {"epochs": 2, "max_length": 512, "lora": {"r": 8}, **gpu},
            # Chosen and rejected, by the policy (full fine-tuning) and by the reference model.
            "dpo": {"epochs": 1, "max_length": 256, **gpu},
            # Trained on the 100 held-out rows; on two workers of one GPU each.
            "judge": {
                "kind": "reward",
                "max_length": 128,
                "data": {
                    "sources": [{"name": "hh_rlhf", "origin": "hub", "subset": "harmless-base", "sample": 1000}],
                    "holdout": 0.1,
                    "rows": "heldout",
                },
                "resources": {"num_workers": 2, "gpus_per_worker": 1},
            },  # fmt: skip
            # The first answer, then a critique and a revision in each of 2 rounds: 5 generations a row.
            "critique": {
                "kind": "critique_revision",
                "rounds": 2,
                "few_shot": 0,
                "max_prompt_length": 100,
                "generation": {"max_new_tokens": 20},
                **gpu,
            },  # fmt: skip
            # SFT on the 900 records the critique stage built, on CPU: tokens, no GPU-hours.
            "sl": {"kind": "sft", "input": "sft", "max_length": 64, "data": {"sources": [{"name": "stage", "stage": "critique"}]}},
            # 10 steps of 8 completions (4 a prompt) of 16 new tokens after 32 prompt tokens.
            "rl": {
                "reward_model": "judge",
                "max_steps": 10,
                "batch_size": 8,
                "num_generations": 4,
                "max_new_tokens": 16,
                "max_prompt_length": 32,
                "max_length": 64,
                "beta": 0.0,
                "lora": {"r": 8},
                **gpu,
            },  # fmt: skip
        }
    )
    rates = Rates(throughput=1000, params=7e9, gen_throughput=500)
    estimates, models = estimate_study(trials, plan_study(trials), rates)
    assert models == {"meta-llama/Llama-2-7b-hf": 7e9}
    e = {x.name: x for x in estimates}
    hour = 3600 * 1000  # tokens in an hour at the training rate, for the 7B model the rate is for
    assert (e["sft"].rows, e["sft"].tokens, e["sft"].gpus) == (900, 900 * 2 * 512, 1)
    assert e["sft"].hours == pytest.approx(921_600 / hour)
    assert e["dpo"].tokens == 900 * 2 * 256 * 2
    assert e["dpo"].hours == pytest.approx(900 * 2 * 256 * (1.5 + 0.5) / hour)
    assert (e["judge"].rows, e["judge"].tokens, e["judge"].gpus) == (pytest.approx(100), pytest.approx(100 * 2 * 128), 2)
    assert e["judge"].hours == pytest.approx(100 * 2 * 128 * 1.5 / hour)  # GPU-hours do not depend on the GPU count
    generated, prompts = 900 * 5 * 20, 900 * 5 * 100
    assert e["critique"].tokens == generated + prompts
    assert e["critique"].hours == pytest.approx(generated / (3600 * 500) + prompts * 0.5 / hour)
    assert (e["sl"].rows, e["sl"].tokens, e["sl"].gpus, e["sl"].hours) == (900, 900 * 64, 0, None)
    # rl: 80 completions generated (after their prompts), trained on with LoRA, scored by the judge
    # (a stage grown from the base: 7B); beta 0, so no reference model.
    c = 10 * 8
    assert e["rl"].hours == pytest.approx(c * 16 / (3600 * 500) + (c * 32 * 0.5 + c * 48 * 1.0 + c * 48 * 0.5) / hour)
    # Half the parameters, half the time.
    half = _study({"sft": {"epochs": 2, "max_length": 512, "lora": {"r": 8}, **gpu}}, base="someone/model-3.5b")
    [small], _ = estimate_study(half, plan_study(half), rates)
    assert small.hours == pytest.approx(e["sft"].hours / 2)


def test_unknown_sizes_and_rows_are_said_not_guessed():
    trials = _study({"sft": {"max_length": 512, "resources": {"gpus_per_worker": 1}}}, base="someone/chat-model")
    [sft], models = estimate_study(trials, plan_study(trials))
    assert models == {"someone/chat-model": None}
    assert sft.tokens == 900 * 512 and sft.hours is None and sft.note == "unknown size"
    doc = {"name": "s", "data": {"sources": [{"name": "shp", "origin": "hub", "subset": "askscience"}]}, "stages": {"sft": {}}}
    trials = expand(doc, "s.yaml")
    [sft], _ = estimate_study(trials, plan_study(trials))  # no hub_rows figure for one subreddit
    assert sft.rows is None and sft.hours is None and sft.note.startswith("rows unknown")


def test_plan_prints_the_cost_of_a_paper_profile_offline(tmp_path):
    out = farm("plan", ROOT / "jobs" / "diversity.yaml", "--profile", "paper", "--results", tmp_path).stdout
    table = out[out.index("Estimated cost") : out.index("Estimated peak GPU memory")]
    assert "facebook/opt-1.3b: 1.3B parameters, OpenAssistant/reward-model-deberta-v3-large-v2: 435M parameters" in table
    # The shared builders once each, with the rows of HH-RLHF's train split less 2% held out.
    rankings = next(line for line in table.splitlines() if line.split()[:2] == ["rankings", "rank"])
    assert "157,584" in rankings and rankings.split()[-1] == "144"
    assert table.count("\n  policy ") == 144
    total = next(line for line in table.splitlines() if line.startswith("  total: "))
    with_reuse, without = (float(x.split(" GPU-hours")[0].replace(",", "")) for x in total.removeprefix("  total: ").split("; "))
    assert 0 < with_reuse < without
    assert "eval (144 runs) and labelling: not estimated" in table


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")))
def test_every_paper_stage_fits_the_gpu_it_asks_for(job):
    from farm.estimate import memory_study
    from farm.grid import load_study

    trials = load_study(ROOT / "jobs" / job, "paper")
    rows = [r for r in memory_study(trials, plan_study(trials)) if r.gpus]
    assert rows, "a paper profile runs on GPUs"
    for r in rows:
        assert r.memory is not None, f"{job}: {r.name}: not estimated"
        assert r.memory.fits, f"{job}: {r.name} needs {r.memory.total / 2**30:.1f} GiB, its {r.memory.gpu} has {r.memory.capacity / 2**30:g}"


def test_plan_prints_peak_memory_beside_the_gpu_and_artifact_sizes(tmp_path):
    out = farm("plan", ROOT / "jobs" / "malign_labels.yaml", "--profile", "paper", "--results", tmp_path).stdout
    table = out[out.index("Estimated peak GPU memory") :].splitlines()
    sft = next(line.split() for line in table if line.split()[:2] == ["sft", "sft"])
    # 18.4 GiB: the bf16 base (12.6), LoRA's state, 4 x 1024 tokens of checkpointed activations and logits.
    assert sft[3:] == ["18.4", "GiB", "A10G", "22.5", "GiB", "(assumed)", "yes", "on", "32.0", "MiB", "LoRA", "adapter"]
    assert next(line.split() for line in table if line.split()[:1] == ["eval"])[3:11] == [
        "18.5",
        "GiB",
        "A10G",
        "22.5",
        "GiB",
        "(assumed)",
        "yes",
        "-",
    ]
    runs = int(sft[2])  # one LoRA adapter of 32 MiB per distinct SFT stage
    assert f"  artifacts in all: {runs * 32 / 1024:.1f} GiB ({runs} stages)" in table
    assert any(line.startswith("  assumed: a stage or eval that names no accelerator_type lands on an A10G (22.5 GiB)") for line in table)


def test_run_refuses_a_stage_that_cannot_fit_its_gpu(write_study, tmp_path):
    # Full fine-tuning of a 7B model on one A10G: fp32 weights, gradients and AdamW state are 100 GiB.
    doc = {"name": "big", "model": {"base": "meta-llama/Llama-2-7b-hf"}, "data": {"sources": [{"name": "hh_rlhf"}]},
           "stages": {"sft": {"batch_size": 8, "grad_accum": 2, "max_length": 1024, "resources": {"gpus_per_worker": 1}}}}  # fmt: skip
    # (No hub here: the preflight would refuse the model first; the memory check needs only its size.)
    proc = farm("run", write_study(doc), "--results", tmp_path / "results", "--no-preflight", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "stages.sft: needs an estimated 1" in err and "GiB per GPU" in err
    assert "more than its GPU holds: A10G, 22.5 GiB (assumed: no accelerator_type is set)" in err
    assert "lora: {r: 8}" in err and "batch_size: 4 with grad_accum: 4 (the same effective batch)" in err
    assert "deepspeed: zero3" in err and "gradient_checkpointing" not in err  # on already, by size
    assert "resources.accelerator_type: H200 (140.4 GiB)" in err  # the one GPU that holds it alone
    assert "Ray ready" not in proc.stdout and not (tmp_path / "results").exists()  # refused before Ray started
