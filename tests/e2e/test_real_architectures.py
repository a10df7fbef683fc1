"""Llama-style (chat template, no pad, <s>) and OPT-style (</s> as BOS) tiny models whose configs
say float16 go through SFT -> DPO -> evaluation under `farm run`, named by local path as a user
names a downloaded snapshot: fp32 on the CPU, LoRA artifacts of adapter size, the eval's
reference the adapter-disabled model, and a LoRA stage that fails once resuming from its checkpoint."""

import json

import pytest
import yaml
from conftest import farm, read_json
from safetensors import safe_open
from tiny_models import tiny_model_dir

pytestmark = pytest.mark.slow


def study(tmp_path):
    doc = {
        "name": "arch",
        "seed": 1,
        "model": {"base": "llama"},
        "data": {"sources": [{"name": "hh_rlhf", "limit": 80}], "holdout": 0.2},
        "stages": {
            # Llama's SFT fails once after step 2, after its checkpoint at step 1: Tune's retry resumes.
            "sft": {
                "max_steps": 3,
                "batch_size": 4,
                "max_length": 48,
                "max_prompt_length": 24,
                "lr": 1e-3,
                "lora": {"r": 4, "alpha": 8},
                "checkpoint_every": {"steps": 1},
                "fault": {"at_step": 2, "times": 1, "trial": "base=llama"},
            },
            "dpo": {"max_steps": 2, "batch_size": 4, "max_length": 48, "max_prompt_length": 24, "lr": 1e-3, "lora": {"r": 4, "alpha": 8}},
        },
        "eval": {"metrics": ["preference_accuracy", "perplexity"], "limit": 8, "max_length": 48, "max_prompt_length": 24},
        "max_failures": 1,
        "grid": {"model.base": {"llama": str(tiny_model_dir("llama")), "opt": str(tiny_model_dir("opt"))}},
    }
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_llama_and_opt_through_sft_dpo_and_eval(tmp_path):
    path, results = study(tmp_path), tmp_path / "results"
    farm("run", path, "--results", results)
    store = results / ".store" / "artifacts"
    for trial in ("base=llama", "base=opt"):
        saved = read_json(results / "arch" / trial / "metrics.json")
        assert saved["status"] == "ok", saved
        m = saved["metrics"]
        assert 0 <= m["reward_accuracy"] <= 1 and m["reward_margin"] != 0 and m["perplexity"] > 1
        assert m["eval_device"] == "cpu"
        resumed = saved["stages"]["sft"]["metrics"]["resumed_from_step"]
        assert resumed == (1 if trial == "base=llama" else None) and saved["stages"]["sft"]["metrics"]["train_steps"] == 3
    adapters = sorted(store.glob("*/adapter"))
    assert len(adapters) == 4  # sft and dpo of each model: adapters, no weights
    for adapter in adapters:
        art = adapter.parent
        assert not list(art.glob("model*.safetensors"))
        base = json.loads((art / "farm-base.json").read_text())
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype.itemsize for k in f.keys()} == {4}  # adapters trained and saved in fp32
        if art.name.startswith("dpo"):
            assert base["stage"][0] == "sft" and (store / "-".join(base["stage"])).is_dir()
        else:
            assert base["model"]["base"].endswith(("llama", "opt"))
