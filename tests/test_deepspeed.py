"""DeepSpeed for a stage: the ZeRO presets, a JSON file, the spec's checks, and (with a GPU) a
real SFT stage under ZeRO-2."""

import importlib.util
import json

import pytest
import torch

from farm.models import DEEPSPEED_PRESETS, deepspeed_config
from farm.spec import StudyError, expand

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
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


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (pip install 'farm[deepspeed]')")
@pytest.mark.parametrize("name", DEEPSPEED_PRESETS)
def test_transformers_accepts_each_preset(name, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), deepspeed=deepspeed_config(name), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[],
    )
    filled = args.hf_deepspeed_config.config
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["optimizer"]["params"]["lr"] == 1e-3
    assert filled["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed ZeRO trains on CUDA GPUs only; none here")
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (pip install 'farm[deepspeed]')")
def test_an_sft_stage_trains_under_zero2(tiny_doc, tmp_path, monkeypatch):
    from farm.data.prepare import training_records
    from farm.models import load_artifact
    from farm.registry import stages
    from farm.train.base import StageContext

    # One process as a world of one: DeepSpeed wants the variables a launcher would set.
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(k, v)
    tiny_doc["stages"] = {"sft": {**tiny_doc["stages"]["sft"], "deepspeed": "zero2", "resources": {"gpus_per_worker": 1}}}
    study = expand(tiny_doc, "s.yaml")[0].study
    stage = study.stages["sft"]
    records, _ = training_records(study.data, study.seed, stage.shape)
    out = tmp_path / "sft"
    out.mkdir()
    ctx = StageContext("sft", stage, study.model, study.seed, None, records, out, tmp_path / "work", [])
    try:
        metrics = stages.get("sft")(ctx)
    finally:  # later tests in this process train without a process group
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert metrics["train_steps"] == stage.max_steps and metrics["train_loss"] > 0
    model, tok = load_artifact(out)
    assert len(tok) == model.config.vocab_size
