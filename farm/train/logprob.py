"""Which kernel computes per-token log-probabilities under TRL's fused LM head.

TRL 1.16's SFT, DPO, GRPO and RLOO trainers score tokens through `add_fused_lm_head`, whose
kernel (`trl.kernels.ChunkedLogProbFunction`) never materializes the `[tokens, vocab]` logits:
built for 100k+ vocabularies on GPUs, where it runs as Triton. Without Triton (the CPU) it folds
each tile with a dozen whole-tile torch passes and recomputes the projection in the backward, and
it scores every position, masked or not: on the embedded profile's 4k vocabulary that was 52% of
an SFT worker's time (py-spy, issue 23). Where the logits are small and there is no Triton, the
plain projection + `log_softmax` (one fused ATen pass each way) gives the same values to float
noise, faster (bench/step_efficiency.py); everywhere else TRL's kernel runs. On a CPU, only the
positions with a label are scored, as TRL does on GPUs.
"""

from __future__ import annotations

# Above this many logits (fp32: 1 GiB) the chunked kernel's memory saving pays even on a CPU.
PLAIN_MAX_LOGITS = 1 << 28


def plain_pays(hidden, weight) -> bool:
    """The plain head: no Triton on this device, and logits that fit comfortably."""
    from trl.kernels.chunked_logprob import _use_triton

    return not _use_triton(hidden.device) and hidden.shape[0] * weight.shape[0] <= PLAIN_MAX_LOGITS


def plain_logprobs(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=("log_probs",)):
    """`ChunkedLogProbFunction.apply`'s contract through whole logits: (log_probs, entropy,
    log_sum_sq_probs, mean_logits, is_top1), the optional ones None unless in `outputs`, the
    last three without gradient. `chunk_size` is the chunked kernel's and unused here."""
    import torch
    import torch.nn.functional as F

    z = F.linear(hidden, weight, bias).float() * logit_scale  # in autocast's dtype, folded in fp32 (as TRL)
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    z = z / temperature
    logp = z.log_softmax(-1)
    log_probs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
    with torch.no_grad():
        log_sum_sq_probs = torch.logsumexp(2 * logp, -1) if "log_sum_sq_probs" in outputs else None
        mean_logits = z.mean(-1) if "mean_logits" in outputs else None
        is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None  # argmax: the first maximum, as TRL
    return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


def compact(device) -> bool:
    """Whether TRL's fused forward scores only the positions with a label (its path on Triton
    devices) rather than every position, prompt and padding included (its path elsewhere, kept
    for compilers that would recompile on every new shape): on a CPU, eager, fewer rows is only
    less work (a DPO batch's prompts are most of its tokens)."""
    from trl.kernels.chunked_logprob import _use_triton

    return device.type == "cpu" or _use_triton(device)


class LogProbKernel:
    """Stands in for `ChunkedLogProbFunction` where TRL's fused head calls it: the plain head
    where it pays (`plain_pays`), TRL's kernel otherwise."""

    chunked = None  # TRL's kernel, set by install()

    @classmethod
    def apply(cls, hidden, weight, *args):
        if plain_pays(hidden, weight):
            return plain_logprobs(hidden, weight, *args)
        return cls.chunked.apply(hidden, weight, *args)


def install() -> None:
    """Route TRL's fused LM head through `LogProbKernel` in this process (idempotent). The fused
    forward looks the kernel up in `trl.trainer.utils` on every call; a TRL without that name
        fails here, loudly, rather than silently keeping the slow path (tests/test_logprob.py). The
    compaction rule `_use_triton` is looked up there too (the kernels module keeps its own)."""
    import trl.trainer.utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is not LogProbKernel:
        LogProbKernel.chunked = trl_utils._ChunkedLogProbFunction
        trl_utils._ChunkedLogProbFunction, trl_utils._use_triton = LogProbKernel, compact
