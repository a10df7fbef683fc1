"""DeepSpeed for a stage: the ZeRO presets, a JSON file, the spec's checks, and SFT stages under
ZeRO-2 and ZeRO-3 with two Ray Train workers on CPU through `farm run`.

`make test` installs the `deepspeed` extra, so nothing here skips: a missing install fails."""

import importlib.util
import json
import math

import pytest
import torch
from conftest import farm, read_json

from farm.config import StudyError
from farm.grid import expand
from farm.models import DEEPSPEED_PRESETS, deepspeed_config

# Every value transformers fills from the stage's TrainingArguments and the model.
AUTO = [
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer.params.lr",
    "optimizer.params.weight_decay",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.reduce_bucket_size",
]


def at(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


@pytest.mark.parametrize("name", DEEPSPEED_PRESETS)
def test_presets_leave_the_training_values_to_transformers(name):
    c = deepspeed_config(name)
    for key in AUTO:
        assert at(c, key) == "auto", key
    zero = c["zero_optimization"]
    assert zero["overlap_comm"] and zero["contiguous_gradients"]
    assert "scheduler" not in c  # the stage's own lr_scheduler and warmup stay in charge


def test_zero2():
    zero = deepspeed_config("zero2")["zero_optimization"]
    assert zero["stage"] == 2
    assert not any(k.startswith(("stage3_", "offload_")) for k in zero)


@pytest.mark.parametrize("name", ["zero3", "zero3_offload"])
def test_zero3_saves_a_whole_model(name):
    zero = deepspeed_config(name)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["stage3_prefetch_bucket_size"] == zero["stage3_param_persistence_threshold"] == "auto"


def test_only_zero3_offload_offloads():
    assert "offload_optimizer" not in deepspeed_config("zero3")["zero_optimization"]
    zero = deepspeed_config("zero3_offload")["zero_optimization"]
    for part in ("offload_optimizer", "offload_param"):
        assert zero[part] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_on_a_cpu_the_presets_step_with_torch_adamw(name):
    # DeepSpeed's own AdamW (FusedAdam) is a C++ op on a CPU, compiled on first use (~2 min).
    assert deepspeed_config(name, cpu=True)["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in deepspeed_config(name)["optimizer"]["params"]  # a GPU keeps FusedAdam


def test_offload_keeps_deepspeed_cpu_adam_even_on_a_cpu():
    # ZeRO-Offload refuses a torch optimizer (zero_force_ds_cpu_optimizer): it needs DeepSpeedCPUAdam.
    assert "torch_adam" not in deepspeed_config("zero3_offload", cpu=True)["optimizer"]["params"]


def test_presets_are_fresh_dicts():
    deepspeed_config("zero2")["zero_optimization"]["stage"] = 0  # transformers fills dicts in place
    assert deepspeed_config("zero2")["zero_optimization"]["stage"] == 2


def test_a_dict_passes_through_and_none_stays_none():
    mine = {"zero_optimization": {"stage": 1}}
    assert deepspeed_config(mine) is mine and deepspeed_config(None) is None


def test_a_json_file_is_loaded(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}))
    assert deepspeed_config(str(path)) == {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto"}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_bad_json_file_names_the_file(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="ds.json"):
        deepspeed_config(str(path))


def test_without_deepspeed_a_running_stage_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else object())
    with pytest.raises(ImportError, match=r"pip install 'farm\[deepspeed\]'"):
        deepspeed_config("zero2", check_installed=True)
    assert deepspeed_config(None, check_installed=True) is None  # no DeepSpeed asked, none needed


# The study file's field.


def study_with(tiny_doc, value):
    tiny_doc["stages"]["sft"]["deepspeed"] = value
    return expand(tiny_doc, "s.yaml")[0].study.stages["sft"]


@pytest.mark.parametrize("name", DEEPSPEED_PRESETS)
def test_spec_accepts_each_preset(tiny_doc, name):
    assert study_with(tiny_doc, name).deepspeed == name


def test_spec_reads_a_json_file_into_the_config(tiny_doc, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    stage = study_with(tiny_doc, str(path))
    # Its content, not its path: the cache key follows an edit of the file, and Ray workers
    # (another cwd, another node) need no copy of it.
    assert stage.deepspeed == {"zero_optimization": {"stage": 2}}
    assert study_with(tiny_doc, {"zero_optimization": {"stage": 1}}).deepspeed == {"zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("value", ["zero4", "Zero2", "ds_config.yaml", "missing.json"])
def test_spec_refuses_anything_else_naming_the_allowed_values(tiny_doc, value):
    with pytest.raises(StudyError) as e:
        study_with(tiny_doc, value)
    message = str(e.value)
    assert "deepspeed" in message and repr(value) in message
    assert all(name in message for name in DEEPSPEED_PRESETS) and ".json" in message


def test_spec_refuses_a_json_file_that_is_not_json(tiny_doc, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("{stage: 2")
    with pytest.raises(StudyError, match="not valid JSON"):
        study_with(tiny_doc, str(path))


# transformers itself.


@pytest.mark.parametrize("name", DEEPSPEED_PRESETS)
def test_transformers_accepts_each_preset(name, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        deepspeed=deepspeed_config(name),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        report_to=[],
    )
    filled = args.hf_deepspeed_config.config
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["optimizer"]["params"]["lr"] == 1e-3
    assert filled["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)


# ZeRO-2 and ZeRO-3 end to end on CPU: two Ray Train workers over gloo, through `farm run`.

SFT = {
    "kind": "sft",
    "batch_size": 4,
    "max_length": 32,
    "max_prompt_length": 16,
    "lr": 1.0e-3,
    "resources": {"num_workers": 2, "cpus_per_worker": 1},
    # One epoch, not max_steps: the step count then also tells how many workers shared the data.
}
# One trial chaining a ZeRO-2 stage into a ZeRO-3 one: both run in one Ray start, one TorchTrainer
# fit and one eval (a grid over the preset paid the fit and the eval twice: 277 s vs 217 s on a
# loaded 2-core machine), and the ZeRO-3 stage starts from the ZeRO-2 artifact in the same worker
# processes, as a real chain would.
ZERO_STUDY = {
    "name": "zero",
    "seed": 1,
    "model": {"base": "tiny-gpt2", "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}},
    "data": {"sources": [{"name": "hh_rlhf", "limit": 60}], "holdout": 0.2},
    "stages": {"zero2": {**SFT, "deepspeed": "zero2"}, "zero3": {**SFT, "deepspeed": "zero3"}},
    "eval": {"metrics": ["preference_accuracy", "perplexity"], "limit": 8, "max_length": 32, "max_prompt_length": 16},
}


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """(results folder, the trial's metrics.json) of the study run once."""
    import yaml

    d = tmp_path_factory.mktemp("zero")
    study = d / "zero.yaml"
    study.write_text(yaml.safe_dump(ZERO_STUDY, sort_keys=False))
    proc = farm("run", study, "--results", d / "results")
    trial = read_json(d / "results" / "zero" / "base" / "metrics.json")
    assert trial["status"] == "ok", proc.stdout + proc.stderr
    return d / "results", trial


@pytest.mark.slow
def test_the_chain_is_evaluated_from_its_zero3_artifact(zero_run):
    results, trial = zero_run
    from farm.store import MARKER

    evaluated = read_json(results / ".store" / "artifacts" / f"eval-{trial['eval_key']}" / MARKER)
    assert evaluated["model_key"] == trial["stages"]["zero3"]["key"]
    for name in ("perplexity", "preference_accuracy", "reward_accuracy", "reward_margin"):
        assert math.isfinite(trial["metrics"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("stage, zero", [("zero2", 2), ("zero3", 3)])
def test_a_zero_stage_trains_on_two_cpu_workers_and_saves_a_whole_model(zero_run, stage, zero):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from farm.models import base_model

    results, trial = zero_run
    record = trial["stages"][stage]
    m = record["metrics"]
    # DeepSpeed's engine ran the preset's ZeRO stage over both workers ...
    assert m["zero_stage"] == zero and m["train_world_size"] == 2
    # ... and each worker read half the rows: one epoch took half the steps one worker alone
    # would take (accelerate pads the shorter shard: ceil).
    rows, batch = m["train_rows"], SFT["batch_size"]
    assert m["train_steps"] == math.ceil(rows / (batch * 2)) < math.ceil(rows / batch)
    assert math.isfinite(m["train_loss"]) and m["train_loss"] > 0

    # The artifact is a whole model: it loads without DeepSpeed with every tensor at the shape of
    # a freshly built model (under ZeRO-3 each rank holds a shard; an ungathered save writes empty
    # tensors), and it is the trained model, not the one the stage started from.
    store = results / ".store" / "artifacts"
    artifact = store / f"sft-{record['key']}"
    if stage == "zero2":
        study = expand(ZERO_STUDY, "zero.yaml")[0].study
        start = base_model(study.model, study.seed)[0].state_dict()
    else:  # it starts from the ZeRO-2 stage's artifact
        assert record["input_key"] == trial["stages"]["zero2"]["key"]
        start = AutoModelForCausalLM.from_pretrained(store / f"sft-{record['input_key']}").state_dict()
    saved = load_file(artifact / "model.safetensors")
    assert saved and all(saved[k].shape == start[k].shape for k in saved), {k: tuple(v.shape) for k, v in saved.items()}
    model, info = AutoModelForCausalLM.from_pretrained(artifact, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected, resized or in error
    got = model.state_dict()
    assert got.keys() == start.keys() and all(got[k].shape == start[k].shape for k in start)
    assert all(torch.isfinite(t).all() for t in got.values())
    changed = {k for k in start if not torch.equal(got[k], start[k])}
    assert {"transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"} <= changed
    ids = torch.arange(16).unsqueeze(0)
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
