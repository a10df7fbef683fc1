"""Peak GPU memory (farm/memory.py, farm.estimate.stage_memory): the formula against cases worked
by hand, the measured activation figures re-measured on narrow layers, and the GPU a stage names."""

import importlib.util

import pytest
import yaml
from conftest import ROOT

from farm import memory
from farm.config import StudyError
from farm.estimate import artifact_size, eval_memory, stage_memory
from farm.grid import expand
from farm.memory import ACTIVATIONS, CUDA_CONTEXT, HEAD_TRAIN_PER_VOCAB, LLAMA2_7B, OPT_1_3B, GiB, arch_from_config

LLAMA = arch_from_config(LLAMA2_7B)
OPT = arch_from_config(OPT_1_3B)


def _study(stages: dict, base: str = "meta-llama/Llama-2-7b-hf", **extra):
    doc = {"name": "s", "model": {"base": base}, "data": {"sources": [{"name": "hh_rlhf"}]}, "stages": stages, **extra}
    return expand(doc, "s.yaml")[0].study


def test_parameters_and_adapters_by_hand():
    # Llama-2-7B: per layer 4 h^2 of attention and 3 h x ffn of MLP; untied embeddings and head.
    assert LLAMA.params == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 32000 * 4096 == 6_738_149_376
    # r x (in + out) per targeted module and layer: q, k, v, o are 4096 x 4096 (8.4M; peft prints 8,388,608).
    assert memory.lora_params(LLAMA, 8) == 32 * 8 * 4 * (4096 + 4096) == 8_388_608
    # OPT's default targets are its four attention projections; GPT-2's c_attn (h -> 3h) and both c_proj (h -> h, 4h -> h).
    assert memory.lora_params(OPT, 16) == 24 * 16 * 4 * (2048 + 2048)
    gpt2 = arch_from_config(memory.GPT2)
    assert memory.lora_params(gpt2, 8) == 12 * 8 * ((768 + 3 * 768) + (768 + 768) + (3072 + 768))
    assert memory.lora_params(LLAMA, 8, ["gate_proj", "down_proj"]) == 32 * 8 * 2 * (4096 + 11008)
    assert memory.lora_params(LLAMA, 8, ["c_attn"]) is None  # not a Llama module: unknown, not guessed
    # The default targets are the ones farm.models gives peft.
    from farm.models import LORA_TARGETS

    assert all(tuple(LORA_TARGETS[t][0]) == memory.LORA_TARGETS[t] for t in LORA_TARGETS)


def test_lora_sft_of_llama_by_hand():
    # LoRA r=8, 4 rows of 1024 tokens; 6.7B parameters, so gradient checkpointing is on by default.
    study = _study({"sft": {"batch_size": 4, "max_length": 1024, "lora": {"r": 8}, "resources": {"gpus_per_worker": 1}}})
    m = stage_memory("sft", study)
    n, a = LLAMA.params, 8_388_608
    act = ACTIVATIONS["llama"]
    assert m.checkpointing and (m.gpu, m.assumed) == ("A10G", True)
    assert m.parts() == {
        "weights": (n - a) * 2 + a * 4,  # the frozen base in bf16, the adapters in fp32
        "weight casts": a * 2,  # autocast's bf16 copies of the (fp32) adapters
        "gradients": a * 4,
        "optimizer": a * 8,
        # Every layer's input (bf16: 2 x 4096), one layer recomputed, and the head: 32,000 x 10 bytes a token.
        "activations": 4 * 1024 * (32 * act["lora_ckpt"] + act["lora"] + 32_000 * HEAD_TRAIN_PER_VOCAB),
    }
    assert act["lora_ckpt"] == 2 * 4096
    total = (2 * n + 16 * a + 4096 * (32 * 8192 + act["lora"] + 320_000)) * 1.1 + CUDA_CONTEXT
    assert m.total == pytest.approx(total) and 18 * GiB < m.total < 19 * GiB and m.fits  # an A10G holds 22.5 GiB
    # Without checkpointing every layer keeps all of its activations: 4 x 1024 x 32 x 230 KB more.
    off = stage_memory("sft", _study({"sft": {"batch_size": 4, "max_length": 1024, "lora": {"r": 8}, "gradient_checkpointing": False,
                                              "resources": {"gpus_per_worker": 1}}}))  # fmt: skip
    assert not off.checkpointing and not off.fits
    assert off.parts()["activations"] - m.parts()["activations"] == 4096 * 32 * (act["lora"] - act["lora_ckpt"]) - 4096 * act["lora"]
    assert artifact_size("sft", study) == (a * 4, "LoRA adapter")


def test_full_dpo_of_opt_by_hand_and_sharded_by_zero():
    # Full fine-tuning: fp32 master weights, their bf16 autocast copies, fp32 gradients and AdamW's
    # two moments, a frozen bf16 reference; chosen and rejected: 2 rows a pair.
    stage = {"batch_size": 2, "max_length": 512, "resources": {"gpus_per_worker": 1, "accelerator_type": "A100"}}
    study = _study({"dpo": stage}, base="facebook/opt-1.3b")
    m = stage_memory("dpo", study)
    n = OPT.params
    act = ACTIVATIONS["opt"]
    assert m.checkpointing  # 1.31B parameters
    assert m.parts() == {
        "weights": n * 4, "weight casts": n * 2, "gradients": n * 4, "optimizer": n * 8, "reference": n * 2,
        "activations": 2 * 2 * 512 * (24 * act["full_ckpt"] + act["full"] + 50_272 * HEAD_TRAIN_PER_VOCAB),
    }  # fmt: skip
    assert (m.gpu, m.assumed, m.capacity) == ("A100", False, 40 * GiB) and m.fits
    assert artifact_size("dpo", study) == (n * 4, "fp32 weights")
    # ZeRO-2 over 4 workers: the model in bf16, gradients and the optimizer's fp32 master + moments sharded.
    zero = stage_memory("dpo", _study({"dpo": {**stage, "deepspeed": "zero2", "resources": {"num_workers": 4, "gpus_per_worker": 1}}},
                                      base="facebook/opt-1.3b"))  # fmt: skip
    assert {k: zero.parts()[k] for k in ("weights", "weight casts", "gradients", "optimizer")} == {
        "weights": n * 2, "weight casts": 0, "gradients": n * 4 / 4, "optimizer": n * 12 / 4}  # fmt: skip
    offload = stage_memory("dpo", _study({"dpo": {**stage, "deepspeed": "zero3_offload"}}, base="facebook/opt-1.3b"))
    assert offload.parts()["weights"] == 2 * OPT.layer_params() * 2 and offload.parts()["optimizer"] == 0  # two layers gathered at a time


def test_builders_and_eval_hold_their_models_in_turn():
    study = _study(
        {
            "sft": {"lora": {"r": 8}, "resources": {"gpus_per_worker": 1}},
            # Generates with the sft model, then scores with a hub reward model: one after the other.
            "rankings": {
                "kind": "rank",
                "generator": "sft",
                "reward_model": "OpenAssistant/reward-model-deberta-v3-large-v2",
                "samples": 2,
                "batch_size": 16,
                "max_length": 512,
                "max_prompt_length": 256,
                "generation": {"batch_size": 8, "max_new_tokens": 128},
                "resources": {"gpus_per_worker": 1},
            },  # fmt: skip
        },
        eval={"metrics": ["perplexity"], "batch_size": 4, "max_length": 256, "resources": {"num_gpus": 1}},
    )
    rank = stage_memory("rankings", study)
    kv = 8 * (256 + 128) * 32 * 2 * 4096 * 2  # keys and values of every layer, bf16
    assert rank.phases["generate"]["kv cache"] == kv
    assert rank.parts() == rank.phases["generate"]  # generating a 7B model's answers outweighs scoring with DeBERTa
    assert rank.phases["score"]["reward model"] == arch_from_config(memory.DEBERTA_V3_LARGE_RM).params * 2
    assert artifact_size("rankings", study) == (None, "records")
    ev = eval_memory(study)
    # A LoRA stage's reference is its adapter disabled: one copy of the model; scoring every token's log-probs.
    assert set(ev.held) == {"model"} and set(ev.phases) == {"score"}
    assert ev.phases["score"]["forward"] == memory.forward_pass(LLAMA, 4 * 256, 4 * 256)


def test_a_stage_names_its_gpu_type():
    study = _study({"sft": {"lora": {"r": 8}, "resources": {"gpus_per_worker": 1, "accelerator_type": "H100"}}})
    assert stage_memory("sft", study).gpu == "H100"
    # Half a GPU: another task may hold the other half of its memory.
    half = _study({"sft": {"lora": {"r": 8}, "resources": {"gpus_per_worker": 0.5, "accelerator_type": "H100"}}})
    assert stage_memory("sft", half).capacity == 79.6 / 2 * GiB
    with pytest.raises(StudyError, match=r"stages.sft.resources: .*accelerator_type: unknown GPU type 'a100'; allowed: T4, L4, A10G, A100"):
        _study({"sft": {"resources": {"gpus_per_worker": 1, "accelerator_type": "a100"}}})
    with pytest.raises(StudyError, match="but gpus_per_worker is 0; set gpus_per_worker or drop accelerator_type"):
        _study({"sft": {"resources": {"accelerator_type": "A100"}}})
    with pytest.raises(StudyError, match="eval.resources: .*but num_gpus is 0"):
        _study({}, eval={"resources": {"accelerator_type": "A100"}})


def test_the_default_gpu_is_the_smallest_of_the_cluster():
    # cluster.yaml's GPU node types by EC2 instance family (what Ray's autoscaler detects on each).
    families = {"g5": "A10G", "g6": "L4", "p4d": "A100", "p4de": "A100-80G", "p5": "H100", "p5e": "H200"}
    nodes = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"].values()
    gpus = [families[n["node_config"]["InstanceType"].split(".")[0]] for n in nodes if n["resources"].get("GPU")]
    assert memory.DEFAULT_GPU == min(gpus, key=memory.GPU_MEMORY_GIB.get) == "A10G"


def _calibration():
    spec = importlib.util.spec_from_file_location("calibrate_activations", ROOT / "bench" / "calibrate_activations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_activation_figures_are_reproduced_on_narrow_layers():
    """farm/memory.py keeps figures measured on Llama-2-7B's and OPT-1.3B's layers; the same code
    on layers 32x narrower (heads of the same size) measures 1/32 of them."""
    cal = _calibration()
    for model_type, cfg in memory.MEASURED.items():
        found = cal.measure(cal.tiny(cfg, 32), tokens=64)
        for key in ("lora", "full", "lora_ckpt", "full_ckpt"):
            assert found[key] * 32 == pytest.approx(ACTIVATIONS[model_type][key], rel=0.03), (model_type, key)
        assert found["weight_casts"] == pytest.approx(memory.WEIGHT_CAST_BYTES, rel=0.01)
        assert found["head"] == pytest.approx(memory.HEAD_SAVED_PER_VOCAB, rel=0.01)
        # Checkpointing keeps the layer's input alone: bf16 for LoRA, the fp32 residual stream for full fine-tuning.
        assert found["lora_ckpt"] == 2 * cfg["hidden_size"] / 32 and found["full_ckpt"] == 4 * cfg["hidden_size"] / 32
