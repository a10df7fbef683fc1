"""Re-measure the activation figures of farm/memory.py (ACTIVATIONS, HEAD_SAVED_PER_VOCAB) on the CPU.

Activation memory is what autograd saves for the backward pass. A forward pass of one real-size
decoder layer under torch.autograd.graph.saved_tensors_hooks sees every tensor it saves; their
storages, counted once each and without the layer's own parameters, are the layer's activations.
Only a forward pass is needed (it runs in bf16 on the CPU: slow, so 256 tokens; the figure is per
token). It runs as the farm trains on a GPU (farm.models.precision): under bf16 autocast, a LoRA
stage with its frozen base in bf16 and fp32 adapters, full fine-tuning with fp32 weights; with
gradient checkpointing (torch.utils.checkpoint, non-reentrant, as transformers uses it) a layer
keeps only its input. Attention runs through SDPA with `is_causal` (no mask), as the flash and
memory-efficient kernels of a GPU do: no seq x seq scores are saved, so the figure is per token.
Under autocast full fine-tuning also saves a bf16 copy of each weight (the `weight_casts`
figure); farm/memory.py counts those as weights (2 bytes/param), not activations.

    python bench/calibrate_activations.py            # both real sizes (~7 min on 2 cores, 4.5 GiB)
    python bench/calibrate_activations.py --tiny     # layers 32x narrower, as the test (seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.memory import ACTIVATIONS, HEAD_SAVED_PER_VOCAB, LORA_TARGETS, MEASURED, WEIGHT_CAST_BYTES, arch_from_config  # noqa: E402


def saved_bytes(run, params, shared=()) -> tuple[int, int]:
    """(bytes of the activations, bytes of weight casts) that `run()` saves for backward: each
    storage once, leaving out the parameters themselves and `shared` tensors (inputs every layer
    reads, e.g. rotary tables). A weight cast is a saved copy of a parameter in another dtype
    (autocast's bf16 copy of an fp32 weight)."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in [*params, *shared]}
    storages: dict[int, tuple[int, bool]] = {}

    def is_cast(t) -> bool:
        weights = [w for p in params if p.dim() == 2 and p.dtype != t.dtype for w in (p.detach(), p.detach().mT)]  # matmuls save W.T
        return any(w.shape == t.shape and torch.equal(w.to(t.dtype), t) for w in weights)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in storages:
            storages[ptr] = (t.untyped_storage().nbytes(), is_cast(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(n for n, c in storages.values() if not c), sum(n for n, c in storages.values() if c)


def build_layer(cfg: dict, mode: str):
    """One decoder layer of the architecture of `cfg` (an HF config dict), as a stage trains it:
    mode "lora" (bf16 frozen weights, fp32 adapters on the farm's default targets) or "full"."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    if cfg["model_type"] == "llama":
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Layer
    elif cfg["model_type"] == "opt":
        from transformers import OPTConfig as Config
        from transformers.models.opt.modeling_opt import OPTDecoderLayer as Layer
    else:
        raise ValueError(f"no calibration for model_type {cfg['model_type']!r}: llama or opt")
    config = Config(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = Layer(config, layer_idx=0).train()
    if mode == "lora":
        layer = layer.to(torch.bfloat16).requires_grad_(False)
        layer = inject_adapter_in_model(
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(LORA_TARGETS[cfg["model_type"]])), layer
        )
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # peft keeps adapters in fp32 (farm.models.precision)
    return layer, config


def layer_bytes(cfg: dict, mode: str, checkpointing: bool, tokens: int = 256) -> tuple[float, float]:
    """(activation bytes per token, weight-cast bytes) of one layer of `cfg` in `mode`."""
    import torch
    from torch.utils.checkpoint import checkpoint

    layer, config = build_layer(cfg, mode)
    params = list(layer.parameters())
    x = torch.randn(1, tokens, cfg["hidden_size"], dtype=torch.bfloat16 if mode == "lora" else torch.float32, requires_grad=True)
    kwargs, shared = {}, []
    if cfg["model_type"] == "llama":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(tokens)[None])
        kwargs["position_embeddings"] = (cos, sin)
        shared = [cos, sin]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if checkpointing:
                checkpoint(layer, x, use_reentrant=False, **kwargs)
            else:
                layer(x, **kwargs)

    acts, casts = saved_bytes(run, params, shared)
    return acts / tokens, casts


def head_bytes(cfg: dict, mode: str = "lora", tokens: int = 256) -> float:
    """Saved bytes per token and vocabulary entry of the LM head and its loss, as transformers
    computes them (bf16 logits under autocast, upcast to fp32, cross-entropy)."""
    import torch
    import torch.nn.functional as F

    arch = arch_from_config(cfg)
    torch.manual_seed(0)
    head = torch.nn.Linear(arch.hidden, arch.vocab, bias=False)
    head = head.to(torch.bfloat16).requires_grad_(False) if mode == "lora" else head
    h = torch.randn(1, tokens, arch.hidden, dtype=torch.bfloat16 if mode == "lora" else torch.float32, requires_grad=True)
    labels = torch.randint(0, arch.vocab, (tokens,))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(h)
        F.cross_entropy(logits.float().view(-1, arch.vocab), labels)

    acts, _ = saved_bytes(run, list(head.parameters()))
    return acts / tokens / arch.vocab


def measure(cfg: dict, tokens: int = 256) -> dict:
    """The figures of farm/memory.py for the architecture of `cfg`: bytes per token and layer
    ("lora", "full", "lora_ckpt", "full_ckpt"), weight casts per parameter, and the head's bytes
    per token and vocabulary entry ("head")."""
    arch = arch_from_config(cfg)
    row: dict = {}
    for mode in ("lora", "full"):
        for ckpt in (False, True):
            per_token, casts = layer_bytes(cfg, mode, ckpt, tokens)
            row[mode + ("_ckpt" if ckpt else "")] = per_token
            if mode == "full" and not ckpt:
                row["weight_casts"] = casts / arch.layer_params()
    # The head of a LoRA stage; full fine-tuning's also saves its bf16 input (2 x hidden per token).
    row["head"] = head_bytes(cfg, "lora", tokens)
    return row


def kept(model_type: str, key: str) -> float:
    """The figure farm/memory.py keeps for a key of `measure`."""
    if key == "head":
        return HEAD_SAVED_PER_VOCAB
    return WEIGHT_CAST_BYTES if key == "weight_casts" else ACTIVATIONS[model_type][key]


def per_layer(key: str) -> bool:
    """Whether a figure is per token and layer (it scales with the width), not per parameter or vocabulary entry."""
    return key in ("lora", "full", "lora_ckpt", "full_ckpt")


def tiny(cfg: dict, factor: int) -> dict:
    """`cfg` with its widths, heads and vocabulary divided by `factor`: the heads keep their size,
    so every per-token figure of a layer scales by 1 / factor (and the head's per-vocab figure not)."""
    keys = ("hidden_size", "intermediate_size", "ffn_dim", "word_embed_proj_dim", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return {**cfg, **{k: max(1, cfg[k] // factor) for k in keys if k in cfg}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="layers 32x narrower (seconds): the figures x 32 should match")
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    factor = 32 if args.tiny else 1
    start = time.time()
    print(f"bf16 autocast, {args.tokens} tokens{f', widths / {factor}, per-layer figures x {factor}' if factor > 1 else ''}:")
    print(f"  {'model':<6} {'figure':<13} {'measured':>10} {'farm/memory.py':>15} {'ratio':>6}")
    worst = 0.0
    for model_type, cfg in MEASURED.items():
        for key, value in measure(tiny(cfg, factor), args.tokens).items():
            value *= factor if per_layer(key) else 1
            ratio = value / kept(model_type, key)
            worst = max(worst, abs(ratio - 1))
            print(f"  {model_type:<6} {key:<13} {value:>10,.3f} {kept(model_type, key):>15,} {ratio:>6.3f}")
    print("  (per token and layer; weight_casts per parameter; head per token and vocabulary entry)")
    print(f"({time.time() - start:.0f}s; largest difference from farm/memory.py: {worst:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
