"""Peak GPU memory per GPU, by arithmetic over a model's architecture. Standard library only: the
GPU check (bench/gpu_check.py) imports it on a machine with torch and transformers and none of the
farm's other dependencies. farm/estimate.py reads a study's stages and calls these functions.

A training step holds, at its peak (the end of the forward pass, when every saved activation is
alive; with gradient accumulation the gradients of the micro-batches before are there too):
- weights: the frozen base of a LoRA stage in bf16 (2 bytes/param), or fp32 master weights
  (4 bytes/param) for full fine-tuning, which under bf16 autocast also keeps a bf16 copy of each
  weight until its layer's backward (autocast's cast cache: 2 bytes/param);
- fp32 gradients (4) and AdamW's two moments (8) for the trainable parameters: LoRA's adapters
  only. DeepSpeed ZeRO shards them over the workers (ZeRO-1: the optimizer state; ZeRO-2: and
  the gradients; ZeRO-3: and the weights; ZeRO-3 offload moves them to host memory); under
  DeepSpeed the model itself is bf16 and the optimizer holds an fp32 master copy (4, sharded);
- activations: bytes per token and layer measured (bench/calibrate_activations.py) times the
  tokens of a micro-batch; with gradient checkpointing each layer keeps its input only and one
  layer is recomputed at a time; plus the LM head's logits and loss (HEAD_TRAIN_PER_VOCAB bytes
  per token and vocabulary entry), which checkpointing does not shrink;
- the other models a stage holds (a reference, a reward model), KV caches of generation, the
  transient working set of forward-only passes; and CUDA's own share (CUDA_CONTEXT) plus the
  caching allocator's fragmentation (ALLOCATOR_SLACK), which torch.cuda.max_memory_allocated
  does not see but the GPU's memory must hold.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30

# GPU memory per Ray accelerator type (ray.util.accelerators), in GiB as nvidia-smi reports the
# total (an "A10G 24 GB" has 22.5 GiB). Ray detects every A100 as "A100"; an 80 GB node must
# declare the custom resource `accelerator_type:A100-80G: 1` itself for a stage to ask for it, so
# "A100" is taken as the 40 GB card.
GPU_MEMORY_GIB = {
    "T4": 15.0, "L4": 22.5, "A10G": 22.5, "A100": 40.0, "A100-40G": 40.0, "A100-80G": 80.0, "H100": 79.6, "H200": 140.4,
}  # fmt: skip
# The smallest GPU of the farm's cluster.yaml (its gpu_a10g node type, g5.2xlarge): a stage that
# names no accelerator_type may land there.
DEFAULT_GPU = "A10G"

# Not seen by torch.cuda.max_memory_allocated but held on the GPU: the CUDA context with its
# kernels, cuBLAS and NCCL workspaces (~0.5-1 GiB on current GPUs), and the caching allocator's
# free blocks between allocations (reserved over allocated: typically 5-15% at the peak).
CUDA_CONTEXT = 1.0 * GiB
ALLOCATOR_SLACK = 0.10

# Activation bytes per token and layer under bf16 autocast, measured with saved-tensor hooks on one
# decoder layer of the reference model (its `hidden` width), forward pass of 256 tokens on the CPU
# (2-core AMD EPYC, transformers 5.24, torch 2.13, peft 0.21, SDPA attention; ~400 s, 4.5 GiB;
# bench/calibrate_activations.py re-measures them, tests/test_memory.py on layers 32x narrower,
# which give the same figures within 2%). "lora": the frozen bf16 layer with fp32 r=8 adapters on
# the default targets (LORA_TARGETS); "full": fp32 weights that train; "_ckpt": with gradient
# checkpointing, the layer's saved input alone: bf16 for LoRA, fp32 for full fine-tuning (the
# embedding's output is fp32 there, and bf16 + fp32 adds to fp32, so the residual stream stays
# fp32 under autocast). A model of another width scales by hidden / `hidden`: its MLP is taken as
# wide relative to the hidden size as the reference's (gated MLPs ~2.7x as Llama's; the others 4x
# as OPT's, GPT-2's, Pythia's, DeBERTa's).
ACTIVATIONS = {
    "llama": {"hidden": 4096, "lora": 230_088, "full": 227_464, "lora_ckpt": 8_192, "full_ckpt": 16_384},  # Llama-2-7B
    "opt": {"hidden": 2048, "lora": 98_504, "full": 73_872, "lora_ckpt": 4_096, "full_ckpt": 8_192},  # OPT-1.3B
}
# Autocast's bf16 copies of fp32 weights that full fine-tuning saves for backward (measured as
# above: 2.000 bytes per parameter of either layer).
WEIGHT_CAST_BYTES = 2.0
# Saved by the LM head and the loss per token and vocabulary entry (measured as above: 4.000 for
# either vocabulary): transformers upcasts the bf16 logits to fp32 and cross-entropy keeps the
# fp32 log-softmax. (Full fine-tuning also saves the head's bf16 input, 2 x hidden: < 0.3%.)
HEAD_SAVED_PER_VOCAB = 4.0
# The head at its peak: the saved figure plus, at the start of the backward pass, the fp32 gradient
# of the logits and its bf16 cast (6 bytes): the bf16 logits and their fp32 copy of the forward
# pass (also 6) are gone by then.
HEAD_TRAIN_PER_VOCAB = HEAD_SAVED_PER_VOCAB + 6.0
# A forward-only pass that scores every token (log-probabilities of answers): bf16 logits, their
# fp32 copy and the fp32 log-softmax.
HEAD_SCORE_PER_VOCAB = 10.0

GATED = ("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3")  # MLPs of three matrices
# LoRA's target modules when a stage names none: farm.models.LORA_TARGETS, else peft's defaults.
LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"), "gpt2": ("c_attn", "c_proj"), "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gpt_neox": ("query_key_value",), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
}  # fmt: skip

# The architectures of the hub models the paper profiles name (their config.json, abridged):
# no hub access is needed to estimate them.
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "torch_dtype": "float16"}  # fmt: skip
OPT_1_3B = {"model_type": "opt", "hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
            "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 2048, "do_layer_norm_before": True,
            "dropout": 0.1, "attention_dropout": 0.0, "activation_function": "relu", "torch_dtype": "float16"}  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
DEBERTA_V3_LARGE_RM = {"model_type": "deberta-v2", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "vocab_size": 128100, "max_position_embeddings": 512, "torch_dtype": "float32"}  # fmt: skip
# OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1's config.json (Study D's judge, as ScalingAlignment's).
OASST_PYTHIA_6_9B_RM = {"model_type": "gpt_neox", "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "vocab_size": 50288, "max_position_embeddings": 2048, "tie_word_embeddings": False,
                        "torch_dtype": "float16"}  # fmt: skip
KNOWN_CONFIGS = {
    "llama-2-7b-hf": LLAMA2_7B, "llama-2-7b-chat-hf": LLAMA2_7B, "opt-1.3b": OPT_1_3B, "gpt2": GPT2,
    "reward-model-deberta-v3-large-v2": DEBERTA_V3_LARGE_RM, "oasst-rm-2-pythia-6.9b-epoch-1": OASST_PYTHIA_6_9B_RM,
}  # fmt: skip
# The configs bench/calibrate_activations.py measures ACTIVATIONS on, by the key of ACTIVATIONS.
MEASURED = {"llama": LLAMA2_7B, "opt": OPT_1_3B}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Arch:
    """What memory depends on in a model's config."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    positions: int = 0  # learned position embeddings (GPT-2's, OPT's)
    tied: bool = True

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def layer_params(self) -> float:
        """Attention (4 h^2, less for grouped key-value heads) and MLP (2 or, gated, 3 h x ffn);
        biases and norms are left out (< 1%)."""
        mlp = 3 if self.model_type in GATED else 2
        return 2 * self.hidden**2 + 2 * self.hidden * self.kv_dim + mlp * self.hidden * self.ffn

    @property
    def params(self) -> float:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2) + self.positions * self.hidden
        return self.layers * self.layer_params() + embeddings

    def linears(self) -> dict[str, list[tuple[int, int]]]:
        """(in, out) of each named linear module of a layer, by the name LoRA targets it by."""
        h, kv, f = self.hidden, self.kv_dim, self.ffn
        if self.model_type == "gpt2":
            return {"c_attn": [(h, 3 * h)], "c_proj": [(h, h), (f, h)], "c_fc": [(h, f)]}
        if self.model_type == "gpt_neox":
            return {"query_key_value": [(h, 3 * h)], "dense": [(h, h)], "dense_h_to_4h": [(h, f)], "dense_4h_to_h": [(f, h)]}
        attn = {"q_proj": [(h, h)], "k_proj": [(h, kv)], "v_proj": [(h, kv)]}
        if self.model_type in GATED:
            return {**attn, "o_proj": [(h, h)], "gate_proj": [(h, f)], "up_proj": [(h, f)], "down_proj": [(f, h)]}
        return {**attn, "out_proj": [(h, h)], "fc1": [(h, f)], "fc2": [(f, h)]}  # opt


def arch_from_config(cfg: dict) -> Arch | None:
    """The Arch of an HF config dict (decoder key names of GPT-2, OPT, Llama and the like); None
    when it lacks the width, depth or vocabulary."""
    h = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    vocab = cfg.get("vocab_size")
    if not (h and layers and vocab):
        return None
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or 1
    return Arch(
        model_type=cfg.get("model_type", ""),
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn=cfg.get("intermediate_size") or cfg.get("ffn_dim") or cfg.get("n_inner") or 4 * h,
        vocab=vocab,
        positions=cfg.get("n_positions")
        or (cfg.get("max_position_embeddings", 0) + 2 if cfg.get("model_type") == "opt" else 0),  # OPT's are offset by 2
        tied=cfg.get("tie_word_embeddings", True),
    )


def known_arch(name: str) -> Arch | None:
    """The Arch of a hub model of KNOWN_CONFIGS, by the name after its owner."""
    cfg = KNOWN_CONFIGS.get(name.rstrip("/").rsplit("/", 1)[-1].lower())
    return arch_from_config(cfg) if cfg else None


def lora_params(arch: Arch, r: int, targets: list[str] | tuple[str, ...] | None = None) -> float | None:
    """Adapter parameters: r x (in + out) per targeted module, per layer. None when a target is
    not a module this file knows the shape of."""
    targets = targets or LORA_TARGETS.get(arch.model_type)
    shapes = arch.linears()
    if not targets or any(t not in shapes for t in targets):
        return None
    return arch.layers * r * sum(i + o for t in targets for i, o in shapes[t])


def training_state(params: float, trainable: float, weight_bytes: int, autocast: bool, zero: int = 0, offload: bool = False,
                   workers: int = 1, layer_params: float = 0.0) -> dict[str, float]:  # fmt: skip
    """Bytes per GPU of the weights, weight casts, gradients and optimizer state of a model of
    `params` parameters of which `trainable` train (fp32) and the rest are frozen in `weight_bytes`.
    `zero` is the DeepSpeed ZeRO stage (0: none) over `workers`; ZeRO-3 also gathers the weights of
    about two layers (`layer_params` each) at a time."""
    frozen = params - trainable
    if not zero:
        return {
            "weights": frozen * weight_bytes + trainable * 4,
            "weight casts": trainable * WEIGHT_CAST_BYTES if autocast else 0.0,  # bf16 copies of fp32 weights, kept for backward
            "gradients": trainable * 4,
            "optimizer": trainable * 8,  # AdamW's exp_avg and exp_avg_sq in fp32
        }
    model_bytes = 2 if autocast else 4  # DeepSpeed's bf16 mode casts the model itself
    master = 4 if autocast else 0  # ...and keeps fp32 master weights in the optimizer
    weights = params * model_bytes
    if zero >= 3:
        weights = (0 if offload else weights / workers) + 2 * layer_params * model_bytes
    sharded = 0.0 if offload else 1.0 / workers
    return {
        "weights": weights,
        "weight casts": 0.0,
        "gradients": trainable * 4 * (sharded if zero >= 2 else 1.0),
        "optimizer": trainable * (8 + master) * sharded,
    }


def layer_activations(arch: Arch, mode: str, checkpointing: bool = False) -> float:
    """Bytes per token one layer saves (ACTIVATIONS, scaled by width): mode "lora" or "full"."""
    ref = ACTIVATIONS["llama" if arch.model_type in GATED else "opt"]
    return ref[mode + ("_ckpt" if checkpointing else "")] * arch.hidden / ref["hidden"]


def activations(arch: Arch, tokens: float, mode: str, checkpointing: bool, lm_head: bool, fp32: bool = False,
                head_tokens: float | None = None) -> float:  # fmt: skip
    """Bytes the forward pass of `tokens` tokens (a micro-batch) leaves for the backward pass:
    every layer's activations, or with checkpointing every layer's input and one layer
    recomputed; the LM head's logits and loss over `head_tokens` (default: every token); twice
    as much in fp32 (no autocast)."""
    full = layer_activations(arch, mode)
    layers = arch.layers * layer_activations(arch, mode, True) + full if checkpointing else arch.layers * full
    head = (tokens if head_tokens is None else head_tokens) * arch.vocab * HEAD_TRAIN_PER_VOCAB if lm_head else 0.0
    return (tokens * layers + head) * (2 if fp32 else 1)


def kv_cache(arch: Arch, sequences: float, length: float, dtype_bytes: int = 2) -> float:
    """Keys and values of every layer for `sequences` sequences of `length` tokens."""
    return sequences * length * arch.layers * 2 * arch.kv_dim * dtype_bytes


def forward_pass(arch: Arch, tokens: float, logits_tokens: float = 0.0) -> float:
    """Transient bytes of a forward-only pass over `tokens` tokens: one layer's working set at a
    time (the MLP's inner activations and a few hidden-size tensors, bf16), and the logits of
    `logits_tokens` tokens scored (all of them when scoring answers; the last one when generating)."""
    return tokens * 2 * (3 * arch.ffn + 4 * arch.hidden) + logits_tokens * arch.vocab * HEAD_SCORE_PER_VOCAB


def training_step(arch: Arch, trainable: float, weight_bytes: int, autocast: bool, tokens: float, checkpointing: bool,
                  lm_head: bool = True, zero: int = 0, offload: bool = False, workers: int = 1,
                  head_tokens: float | None = None) -> dict[str, float]:  # fmt: skip
    """The parts of a training step's peak: the state of training_state and the activations of a
    micro-batch of `tokens` tokens (LoRA when `trainable` is less than the model)."""
    mode = "lora" if trainable < arch.params else "full"
    state = training_state(arch.params, trainable, weight_bytes, autocast, zero, offload, workers, arch.layer_params())
    return {**state, "activations": activations(arch, tokens, mode, checkpointing, lm_head, not autocast, head_tokens)}


def generating(arch: Arch, batch: int, prompt: int, new_tokens: int, weight_bytes: int = 2) -> dict[str, float]:
    """The parts of generating `batch` answers of `new_tokens` tokens after `prompt` tokens: the
    model, the KV cache, the prompt's prefill (logits of its last token only)."""
    return {
        "model": arch.params * weight_bytes,
        "kv cache": kv_cache(arch, batch, prompt + new_tokens),
        "forward": forward_pass(arch, batch * prompt, batch),
    }


def peak(parts: dict[str, float]) -> float:
    """The GPU memory `parts` (bytes allocated by torch) need: with allocator slack and CUDA context."""
    return sum(parts.values()) * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT


def gpu_memory(accelerator_type: str | None) -> tuple[str, float]:
    """(GPU type, its memory in bytes) a stage lands on: the one it names, else DEFAULT_GPU."""
    gpu = accelerator_type or DEFAULT_GPU
    return gpu, GPU_MEMORY_GIB[gpu] * GiB


def smallest_gpu_for(need: float) -> str | None:
    """The GPU type of least memory that holds `need` bytes."""
    fits = [g for g, m in GPU_MEMORY_GIB.items() if m * GiB >= need and g != "A100-40G"]
    return min(fits, key=lambda g: GPU_MEMORY_GIB[g]) if fits else None


@dataclass
class Memory:
    """Peak memory per GPU of a stage or an eval: bytes torch allocates, by part. `held` stays for
    the whole run (weights, optimizer state, the other models); of `phases` (training, generating,
    scoring), which come and go, the largest counts."""

    held: dict[str, float]
    phases: dict[str, dict[str, float]]
    gpu: str  # the GPU type it lands on
    assumed: bool  # named no accelerator_type: DEFAULT_GPU
    checkpointing: bool | None = None  # None: not a training stage
    share: float = 1.0  # of the GPU's memory it may count on: a fractional GPU (0.5) shares it with another task

    def parts(self) -> dict[str, float]:
        """What is allocated at the peak: what is held and the largest phase."""
        largest = max(self.phases.values(), key=lambda p: sum(p.values()), default={})
        return {**self.held, **largest}

    @property
    def total(self) -> float:
        return peak(self.parts())

    @property
    def capacity(self) -> float:
        return gpu_memory(self.gpu)[1] * self.share

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


READ_BYTES = 2  # a model that is only read (generation, scoring, a frozen reference): bf16 on a GPU (farm.models.inference_dtype)


def generating_as(arch: Arch, g, prompt: int) -> dict[str, float]:
    """A model generating as GenerationSpec `g` says after `prompt` tokens."""
    return generating(arch, g.batch_size, prompt, g.max_new_tokens, READ_BYTES)
