"""Check farm/memory.py's peak-memory estimates, and measure throughput, on one GPU.

Models of real architectures with random weights, built from configs (Llama-2-7B's and OPT-1.3B's,
written in farm/memory.py: no hub), run the steps the farm's stages run, as the farm runs them on a
GPU (farm.models.precision): a LoRA SFT step and a DPO step (the policy and its adapter-disabled
reference, chosen and rejected) on 1024-token rows, a full fine-tuning SFT step of OPT-1.3B (fp32
weights, bf16 autocast, AdamW), and a generation batch. Gradient checkpointing is on (the farm's
default for models of 1B parameters and more) and each training step accumulates two micro-batches.
For each it prints the peak memory (torch.cuda.max_memory_allocated) against the estimate of the
same step (farm.memory: what torch allocates, without the allocator slack and CUDA context the
farm adds), the allocator's slack (max_memory_reserved over max_memory_allocated), tokens/s and
MFU (model FLOPs: 6 N per trained token, 2 N per token read or generated, against the GPU's dense
bf16 peak), and writes bench/results/gpu_check.json (gpu_check-cpu-tiny.json in the CPU mode).

Needs torch, transformers and peft only (farm.memory is plain Python): it runs on a GPU machine
without the farm installed. About 2-3 minutes on an H100/H200 (~25 GiB at most).

    python bench/gpu_check.py              # on a GPU
    python bench/gpu_check.py --cpu-tiny   # 2-layer, 32x narrower models on the CPU, in seconds (the test)

On the CPU there is no allocator to ask: the "measured" peak is the bytes of the parameters,
gradients, optimizer state and the tensors autograd saves (or the KV cache) at the end of the
forward pass, which checks the estimate's terms but not CUDA's allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _results import write_result  # noqa: E402

from farm import memory  # noqa: E402  (standard library only)

# Dense bf16 tensor-core peak per GPU, by a part of its device name (NVIDIA's data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
CONFIGS = {"llama-2-7b": memory.LLAMA2_7B, "opt-1.3b": memory.OPT_1_3B}
R = 8  # LoRA rank, on the farm's default targets (farm.memory.LORA_TARGETS)


def build(cfg: dict, device, weights_dtype):
    """A causal LM of `cfg`'s architecture with random weights in `weights_dtype`, on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "torch_dtype"})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=weights_dtype)
    model.config.use_cache = False
    return model


def checkpointing(model) -> None:
    """Gradient checkpointing as transformers does it (non-reentrant): transformers 5.24 renamed the
    method and its argument; the GPU machine's 5.17 may have the old names only."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def with_lora(model, model_type: str):
    """The farm's LoRA: r=8 adapters in fp32 on a frozen base."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=16, lora_dropout=0.05, target_modules=list(memory.LORA_TARGETS[model_type])))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


class Meter:
    """Peak bytes of one step: CUDA's allocator on a GPU; on the CPU the live parameters,
    gradients and optimizer state plus what autograd saves, at the end of each forward pass."""

    def __init__(self, device, model, optimizer=None):
        self.cuda = device.type == "cuda"
        self.model, self.optimizer, self.peak, self.reserved = model, optimizer, 0, 0

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()

    @contextlib.contextmanager
    def forward(self):
        """Around a forward pass: on the CPU, count what it saves for backward."""
        if self.cuda:
            yield
            return
        import torch

        storages: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak = max(self.peak, self.state_bytes() + sum(storages.values()))

    def state_bytes(self) -> int:
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.optimizer is not None:
            tensors += [v for s in self.optimizer.state.values() for v in s.values() if hasattr(v, "untyped_storage") and v.dim()]
        return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def token_logps(model, ids):
    """Summed log-probabilities of each row's tokens after the first (fp32 log-softmax, as TRL)."""
    import torch

    logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def train(model, device, rows: int, length: int, vocab: int, dpo: bool, steps: int, accum: int = 2):
    """`steps` optimizer steps of `accum` micro-batches of `rows` rows (pairs for DPO) of `length`
    tokens, after one warm-up step; (peak bytes, reserved bytes, seconds per timed step)."""
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    meter = Meter(device, model, opt)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step():
        for _ in range(accum):
            ids = torch.randint(0, vocab, ((2 if dpo else 1) * rows, length), generator=gen).to(device)
            if dpo:  # chosen rows first, then rejected; the reference is the adapter disabled
                with torch.no_grad(), model.disable_adapter(), autocast:
                    ref = token_logps(model, ids)
                with meter.forward(), autocast:
                    policy = token_logps(model, ids)
                    margin = (policy[:rows] - ref[:rows]) - (policy[rows:] - ref[rows:])
                    loss = -F.logsigmoid(0.1 * margin).mean()
            else:
                with meter.forward(), autocast:
                    loss = model(input_ids=ids, labels=ids).loss  # transformers' loss: fp32 logits, cross-entropy
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state appears at the first step: measured from the second on
    with meter:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    return meter.peak, meter.reserved, seconds


def generate(model, device, batch: int, prompt: int, new: int, vocab: int):
    """One batch of `batch` answers of exactly `new` tokens after `prompt` random tokens;
    (peak bytes, reserved bytes, seconds)."""
    import torch

    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    meter = Meter(device, model)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, use_cache=True, pad_token_id=0)  # warm-up
        with meter:
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0,
                                 return_dict_in_generate=True)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    if device.type != "cuda":  # the parameters and the KV cache the batch ended with
        meter.peak = meter.state_bytes() + tensor_bytes(out.past_key_values)
    return meter.peak, meter.reserved, seconds


def tensor_bytes(obj, seen=None, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages inside `obj` (a cache object, lists, dicts)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.untyped_storage().nbytes()
    if depth > 4:
        return 0
    items = (
        obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else vars(obj).values() if hasattr(obj, "__dict__") else []
    )
    return sum(tensor_bytes(x, seen, depth + 1) for x in items)


def cases(tiny: bool) -> list[dict]:
    """What to run: per model its config and the sizes of each step."""
    from_tiny = __import__("calibrate_activations").tiny if tiny else None
    out = []
    for name, cfg in CONFIGS.items():
        if tiny:
            cfg = {**from_tiny(cfg, 32), "num_hidden_layers": 2}
        steps = [("lora_sft", 4, 1024), ("lora_dpo", 2, 1024), ("generate", 16, 512)]
        if cfg["model_type"] == "opt":
            steps.append(("full_sft", 4, 1024))  # Study D's full fine-tuning of OPT-1.3B
        if tiny:
            steps = [(s, rows, 32) for s, rows, _ in steps]
        out.append({"name": name + ("-tiny" if tiny else ""), "cfg": cfg, "steps": steps})
    return out


def estimate(arch, step: str, rows: int, length: int, new: int) -> dict[str, float]:
    """farm.memory's parts of the same step (what torch allocates)."""
    if step == "generate":
        return memory.generating(arch, rows, length, new)
    lora = step.startswith("lora")
    trainable = memory.lora_params(arch, R) if lora else arch.params
    tokens = rows * length * (2 if step == "lora_dpo" else 1)
    return memory.training_step(arch, trainable, 2 if lora else 4, autocast=True, tokens=tokens, checkpointing=True)


def _size(n: float) -> str:
    return f"{n / memory.GiB:.2f} GiB" if n >= 0.1 * memory.GiB else f"{n / 2**20:.2f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-tiny", action="store_true", help="2-layer, 32x narrower models on the CPU: seconds, no GPU")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per training case (default: 2 on a GPU, 1 on the CPU)")
    args = p.parse_args()
    import torch

    if not args.cpu_tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a GPU, or with --cpu-tiny", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_tiny else "cuda")
    if args.cpu_tiny:
        torch.set_num_threads(1)  # tiny matmuls: threads only contend (the test runs beside others)
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks for transformers' old checkpointing names
    name = "cpu" if args.cpu_tiny else torch.cuda.get_device_name()
    peak_flops = next((f for k, f in PEAK_BF16.items() if k in name), None)
    new_tokens = 8 if args.cpu_tiny else 256
    rows_out = []
    print(f"gpu_check on {name}{' (tiny models: a proxy of memory, see the docstring)' if args.cpu_tiny else ''}")
    print(f"  {'model':<16} {'step':<9} {'tokens':>7} {'measured':>10} {'estimated':>10} {'ratio':>6} {'slack':>6} {'tokens/s':>10} {'MFU':>6}")
    for case in cases(args.cpu_tiny):
        arch = memory.arch_from_config(case["cfg"])
        for step, rows, length in case["steps"]:
            lora = step.startswith("lora")
            model = build(case["cfg"], device, torch.bfloat16 if lora or step == "generate" else torch.float32)
            if step == "generate":
                model.eval()
                peak, reserved, seconds = generate(model, device, rows, length, new_tokens, arch.vocab)
                tokens, flops = rows * new_tokens, 2 * arch.params * rows * (length + new_tokens)
            else:
                model.train()
                model.config.use_cache = False
                checkpointing(model)
                if lora:
                    model = with_lora(model, case["cfg"]["model_type"])
                steps = args.steps or (1 if args.cpu_tiny else 2)
                peak, reserved, seconds = train(model, device, rows, length, arch.vocab, step == "lora_dpo", steps)
                tokens = 2 * rows * length * (2 if step == "lora_dpo" else 1)  # two micro-batches a step
                flops = 6 * arch.params * tokens
            est = sum(estimate(arch, step, rows, length, new_tokens).values())
            row = {"model": case["name"], "step": step, "rows": rows, "length": length, "tokens_per_step": tokens,
                   "measured_gib": peak / memory.GiB, "estimated_gib": est / memory.GiB, "ratio": peak / est,
                   "seconds": seconds, "tokens_per_s": tokens / seconds}  # fmt: skip
            if reserved:
                row["slack"] = reserved / peak - 1  # farm.memory.ALLOCATOR_SLACK assumes 0.10
            if peak_flops:
                row["mfu"] = flops / seconds / peak_flops
            rows_out.append(row)
            slack = f"{row['slack']:.0%}" if "slack" in row else "-"
            mfu = f"{row['mfu']:.0%}" if "mfu" in row else "-"
            print(f"  {row['model']:<16} {step:<9} {tokens:>7,} {_size(peak):>10} {_size(est):>10} "
                  f"{row['ratio']:>6.2f} {slack:>6} {row['tokens_per_s']:>10,.0f} {mfu:>6}")  # fmt: skip
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ratios = [r["ratio"] for r in rows_out]
    print(f"ratios measured / estimated: {min(ratios):.2f} to {max(ratios):.2f} (1.00: the estimate is exact; above 1 it is short)")
    if args.cpu_tiny:
        print("(CPU proxy: the backward pass's transients and a forward pass's working set are not seen, so ratios fall below 1)")
    assert all(math.isfinite(v) for r in rows_out for v in r.values() if isinstance(v, float))
    # The CPU mode (the test's) writes a file of its own: it never overwrites a GPU run's figures.
    mode = "cpu-tiny" if args.cpu_tiny else "gpu"
    write_result(
        "gpu_check-cpu-tiny" if args.cpu_tiny else "gpu_check", {"device": name, "mode": mode, "torch": torch.__version__, "cases": rows_out}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
