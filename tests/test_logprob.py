"""The plain LM head that stands in for TRL's chunked log-prob kernel on a CPU (farm.train.logprob):
the same values and gradients to float noise, through TRL's own fused forward."""

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from farm.train import logprob

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _inputs(n=37, h=16, v=300, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    b = torch.randn(v, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("softcap,temperature,scale", [(None, 1.0, 1.0), (5.0, 0.7, 0.5)])
def test_plain_head_equals_the_chunked_kernel_values_and_gradients(softcap, temperature, scale):
    hidden, weight, bias, targets = _inputs()
    # A chunk narrower than the vocabulary: the chunked side really folds tiles.
    args = (targets, temperature, 128, softcap, scale, OUTPUTS)
    ref = ChunkedLogProbFunction.apply(hidden, weight, bias, *args)
    got = logprob.plain_logprobs(hidden, weight, bias, *args)
    for name, r, g in zip(OUTPUTS, ref, got):
        if name == "is_top1":
            assert torch.equal(r, g)
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)
    # The gradient of a loss that uses log-probs and entropy (as DFT-style losses do).
    grads = []
    for out in (ref, got):
        (out[0].sum() + 0.3 * out[1].sum()).backward()
        grads.append([t.grad.clone() for t in (hidden, weight, bias)])
        for t in (hidden, weight, bias):
            t.grad = None
    for r, g in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert not any(t.requires_grad for t in got[2:])  # the last three carry no gradient, as TRL's


def test_install_routes_trls_fused_head_and_keeps_the_chunked_kernel_past_the_size_limit(monkeypatch):
    import trl.trainer.utils as trl_utils
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl.kernels import chunked_logprob

    # TRL as shipped, whatever an earlier test of this process installed; undone after the test.
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()  # no dropout
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 300, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt the loss skips

    rows = []  # the rows each call of the plain head scores
    real_plain = logprob.plain_logprobs
    monkeypatch.setattr(logprob, "plain_logprobs", lambda hidden, *a: rows.append(len(hidden)) or real_plain(hidden, *a))
    chunked = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert rows == []  # not installed yet: TRL's kernel
    logprob.install()
    logprob.install()  # idempotent: TRL's kernel is still what it falls back to
    assert trl_utils._ChunkedLogProbFunction is logprob.LogProbKernel and logprob.LogProbKernel.chunked is ChunkedLogProbFunction
    plain = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert rows == [3 * 8]  # only the positions with a label: 11 next tokens a row, less the 3 prompt ones
    torch.testing.assert_close(plain.loss, chunked.loss)
    torch.testing.assert_close(plain.log_probs, chunked.log_probs)
    torch.testing.assert_close(plain.entropy, chunked.entropy)
    # Logits past the limit: the chunked kernel again (it saves memory there, even on a CPU).
    monkeypatch.setattr(logprob, "PLAIN_MAX_LOGITS", 3 * 8 * 300 - 1)
    again = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert rows == [3 * 8]
    torch.testing.assert_close(again.loss, chunked.loss)
