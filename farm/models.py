"""Models and tokenizers: a hub id or local path (clusters), or a tiny GPT-2 built from a config
(the embedded default) with the farm's own small byte-level BPE tokenizer; LoRA via peft."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import model_validator

from farm.config import BUILT_MODELS, LEGACY_HUB_MODELS, Strict, hub_models, local_model_problem, looks_like_path, not_utf8
from farm.data.records import convert
from farm.data.sources import ASSISTANT, HUMAN, SourceSpec, asset_path, load_source

EOS, PAD = "<|endoftext|>", "<|pad|>"
TINY_GPT2 = dict(n_layer=2, n_embd=128, n_head=4, n_positions=256)
FARM_BPE_VOCAB = 4096
# LoRA targets for architectures whose module names peft cannot guess well.
LORA_TARGETS = {
    "gpt2": (["c_attn", "c_proj"], True),
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "opt": (["q_proj", "k_proj", "v_proj", "out_proj"], False),
}


# Gradient checkpointing is on by default from this size. Measured (farm/memory.py, ACTIVATIONS: the
# tensors one bf16 layer saves), a layer keeps 74-99 KB a token unrecomputed for OPT-1.3B and 230 KB
# for Llama-2-7B; checkpointed, its input alone (4-16 KB) and one layer recomputed at a time. For a
# batch of 4 x 1024 tokens that is 6.8-9.0 GiB against 0.8-1.0 for OPT-1.3B (beside full
# fine-tuning's 22 GiB of weights, gradients and AdamW state, or LoRA's 2.4 GiB bf16 base) and 28 GiB
# against 1.9 for Llama-2-7B (more than an A10G holds beside its 12.6 GiB of bf16 weights). Below 1B
# (GPT-2's 124M: 1.3-1.7 GiB) the memory is not worth recomputing every layer's forward pass, ~1/3
# more compute. `farm plan` shows each stage's estimate either way.
CHECKPOINTING_PARAMS = 1e9


def checkpointing(stage, n_params: float | None) -> bool:
    """Whether a training stage recomputes activations: its own `gradient_checkpointing`, else on
    for models of at least CHECKPOINTING_PARAMS parameters."""
    if stage.gradient_checkpointing is not None:
        return stage.gradient_checkpointing
    return n_params is not None and n_params >= CHECKPOINTING_PARAMS


def precision(stage, on_gpu: bool) -> tuple[str, str | None]:
    """(dtype of the frozen weights, dtype of autocast or None) for a training stage.

    On a CPU everything is fp32 (bf16/fp16 matmuls are ~100x slower there). On a GPU a LoRA stage
    keeps its frozen base in bf16 (half the memory; no gradient flows into it) and peft keeps the
    adapters in fp32; full fine-tuning keeps fp32 master weights (an fp16/bf16 weight plus an
    AdamW update of lr 1e-5 rounds back to itself) and computes in bf16 under autocast. Trainable
    heads are fp32 in both (see `train_dtypes`). `precision: fp32` turns bf16 off."""
    if not on_gpu or stage.precision == "fp32":
        return "float32", None
    return ("bfloat16" if stage.lora else "float32"), "bfloat16"


def train_bpe(texts, vocab_size: int = FARM_BPE_VOCAB):
    """A byte-level BPE trained on `texts`; the same texts in the same order give the same vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def bundled_corpus() -> list[str]:
    """The text the farm-bpe tokenizer is trained on: every bundled HH transcript and LIMA answer."""
    texts = []
    for spec in (SourceSpec(name="hh_rlhf"), SourceSpec(name="lima")):
        records = load_source(spec)
        texts += [t.text for t in convert(records, "text")]
        texts += [r.rejected for r in records if hasattr(r, "rejected")]
    return texts


def load_tokenizer(name: str, trust_remote_code: bool = False, chat_template: bool = True, revision: str | None = None):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name == "farm-bpe":
        tok = AutoTokenizer.from_pretrained(str(asset_path("farm_bpe")))
    elif name == "gpt2":
        # Built with `tokenizers` directly: GPT2TokenizerFast(vocab_file=, merges_file=)
        # silently yields an empty tokenizer in transformers 5.
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        files = asset_path("gpt2_tokenizer")
        bpe = models.BPE.from_file(str(files / "vocab.json"), str(files / "merges.txt"))
        raw = Tokenizer(bpe)
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, bos_token=EOS)
    else:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    if not chat_template:
        # Saved with every artifact's tokenizer, so no later stage or eval turns it back on.
        tok.chat_template = None
    return _with_pad(tok)


def _with_pad(tok):
    if tok.pad_token is None:  # Llama-2 and GPT-2 have none; padding is always masked
        tok.pad_token = tok.eos_token
    return tok


def base_model(spec, seed: int, dtype=None):
    """(model, tokenizer) for a study's `model` section, before any stage has trained it, with
    weights in `dtype` (default fp32). transformers 5 would otherwise load the dtype the config
    names: Llama-2 and OPT in fp16, which full fine-tuning turns to NaN and a CPU runs ~100x slower."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    dtype = dtype or torch.float32
    # A tokenizer of the base's own repository is read at the base's revision.
    tok_revision = spec.tokenizer_revision if spec.tokenizer not in (None, spec.base) else spec.revision
    tok = load_tokenizer(spec.tokenizer or spec.base, spec.trust_remote_code, spec.chat_template, tok_revision)
    if spec.base == "tiny-gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **{**TINY_GPT2, **spec.config},
        )
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg).to(dtype), tok
    model = AutoModelForCausalLM.from_pretrained(spec.base, trust_remote_code=spec.trust_remote_code, dtype=dtype, revision=spec.revision)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    return model, tok


# A LoRA stage's artifact holds its adapter (adapter/), its tokenizer and this file, which names
# the model the adapter applies to: {"stage": [kind, key]} (an artifact of the store) or
# {"model": <the study's model section>, "seed": n} (the base model, as a first stage built it).
BASE_FILE = "farm-base.json"


def load_artifact(path, dtype=None, resolve=None, merge: bool = True, revision: str | None = None):
    """(model, tokenizer) saved by a stage (a plain HF model folder, or a LoRA adapter with the
    name of its base), or a hub id, with weights in `dtype` (default fp32). An adapter is applied
    to its base (loaded the same way, recursively) and merged in memory, or, with merge=False,
    kept as a peft model (its adapter can then be disabled to give the base). `resolve(kind, key)`
    is the store's path of a base artifact (default: beside this one, as a local store keeps it);
    `revision` the commit of a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    tok = _with_pad(AutoTokenizer.from_pretrained(str(path), revision=revision))
    if not (Path(path) / BASE_FILE).is_file():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, revision=revision), tok
    return _apply_adapter(_adapter_base(Path(path), dtype, resolve), Path(path), merge), tok


def fetch_bases(path, resolve) -> None:
    """Bring every artifact a LoRA artifact's adapter stands on into the local store layout
    (`resolve` downloads from a remote store), so that it loads with the default resolver:
    for code that is handed only a path (a judge named in the eval spec)."""
    import json

    path = Path(path)
    while resolve and (path / BASE_FILE).is_file():
        ref = json.loads((path / BASE_FILE).read_text())
        if "stage" not in ref:
            return
        path = Path(resolve(*ref["stage"]))


def _adapter_base(path: Path, dtype, resolve):
    """The causal LM a LoRA artifact's adapter applies to, in `dtype`."""
    import json

    ref = json.loads((path / BASE_FILE).read_text())
    if "stage" in ref:
        kind, key = ref["stage"]
        base = resolve(kind, key) if resolve else path.parent / f"{kind}-{key}"
        return load_artifact(base, dtype, resolve)[0]

    return base_model(ModelSpec.model_validate(ref["model"]), ref["seed"], dtype)[0]


def _apply_adapter(model, path: Path, merge: bool):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(path / "adapter"))
    return model.merge_and_unload() if merge else model


def for_inference(path_or_id, resolve=None, reward: bool = False, revision: str | None = None):
    """(model, tokenizer) to score or generate with: on this process's device (farm.models.device)
    in its inference dtype, in eval mode; a reward model (a sequence classifier) if `reward`;
    `revision`: the commit of a hub id (a study's `revisions`)."""
    dev = device()
    load = load_reward_model if reward else load_artifact
    model, tok = load(path_or_id, inference_dtype(dev), resolve, revision=revision)
    return model.to(dev).eval(), tok


def as_reward_model(lm, tok, seed: int):
    """A causal LM as a sequence classifier with one output: its transformer's weights, a new
    seeded head, and the tokenizer's pad id (a decoder reads each row's last non-pad token)."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, tok.pad_token_id, None
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, dtype=lm.dtype)
    missing, _ = model.load_state_dict(lm.state_dict(), strict=False)  # the LM head is left out
    lost = [k for k in missing if k.startswith(model.base_model_prefix + ".")]
    if lost:
        raise ValueError(f"the reward model did not get these weights of the input model: {lost[:5]}")
    return model


def load_reward_model(path_or_id, dtype=None, resolve=None, revision: str | None = None):
    """(reward model, tokenizer): a sequence classifier with one output, saved by a `reward`
    stage (whole, or a LoRA adapter that carries the head) or from the hub (e.g. OpenAssistant's
    reward models) at `revision`, in `dtype` (default fp32) and in eval mode."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dtype = dtype or torch.float32
    tok = _with_pad(AutoTokenizer.from_pretrained(str(path_or_id), revision=revision))
    if (Path(path_or_id) / BASE_FILE).is_file():
        # The head's initial weights do not matter: the adapter carries the trained head.
        model = _apply_adapter(as_reward_model(_adapter_base(Path(path_or_id), dtype, resolve), tok, 0), Path(path_or_id), merge=True)
    elif (config := _config_dict(path_or_id, revision)).get("model_type") == OASST_NEOX:
        model = _oasst_neox_reward_model(path_or_id, config, tok, dtype, revision)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path_or_id), dtype=dtype, revision=revision)
    if model.config.pad_token_id is None:  # a decoder finds each row's last token by the pad id
        model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


# OpenAssistant's Pythia reward models (oasst-rm-2-pythia-6.9b-epoch-1, ScalingAlignment's judge) are of a
# model type that transformers does not know: their class lives in OpenAssistant's training code
# (model_training/models/reward_model.py), which ScalingAlignment copies (`eval_hh/reward_model.py`).
OASST_NEOX = "gpt_neox_reward_model"


def _config_dict(path_or_id, revision: str | None = None) -> dict:
    import json

    from transformers.utils import cached_file

    return json.loads(Path(cached_file(str(path_or_id), "config.json", revision=revision)).read_text())


def _oasst_neox_reward_model(path_or_id, config: dict, tok, dtype, revision: str | None = None):
    """OpenAssistant's GPTNeoXRewardModel as transformers' GPTNeoXForSequenceClassification: the same
    GPT-NeoX body, its `out_proj` (a Linear with a bias, which transformers' `score` lacks) as the
    score head, read at the last token of each row ("last" pooling: the final <|endoftext|>, found
    as the last token that is not <|padding|>)."""
    from torch import nn
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    if config.get("pooling", "last") != "last":
        raise ValueError(
            f"reward model {path_or_id}: pooling {config['pooling']!r} is not supported (the farm reads the last token, OpenAssistant's 'last' pooling)"
        )
    if tok.pad_token_id == tok.eos_token_id:
        raise ValueError(
            f"reward model {path_or_id}: its tokenizer pads with its end-of-text token, so the last token of a row cannot be found; "
            "OpenAssistant's Pythia tokenizers pad with <|padding|>"
        )

    class OasstRewardModel(GPTNeoXForSequenceClassification):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.score = nn.Linear(cfg.hidden_size, 1, bias=True)

    body = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "pooling", "_name_or_path")}
    cfg = GPTNeoXConfig(**body, num_labels=1, pad_token_id=tok.pad_token_id)
    return OasstRewardModel.from_pretrained(str(path_or_id), config=cfg, dtype=dtype, key_mapping={r"^out_proj": "score"}, revision=revision)


def oasst_chat_ids(tok, prompt: str, response: str, limit: int) -> list[int]:
    """A row for an OpenAssistant reward model, as ScalingAlignment writes it (`eval_hh/metrics.py`):
    every turn as `<|prompter|>text<eos>` or `<|assistant|>text<eos>`, the answer the last assistant
    turn, cut from the left to `limit` tokens (the reference's truncation_side "left")."""
    turns = [*hh_messages(prompt), {"role": "assistant", "content": response}]
    text = "".join(
        f"<|{'prompter' if m['role'] == 'user' else 'assistant'}|>{m['content'].strip()}{tok.eos_token}" for m in turns if m["role"] != "system"
    )
    return tok(text, add_special_tokens=False)["input_ids"][-limit:]


def lora_config(lora, model, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    targets, fan_in_fan_out = LORA_TARGETS.get(model.config.model_type, (None, False))
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or targets,
        fan_in_fan_out=fan_in_fan_out,
        task_type=task_type,  # SEQ_CLS also trains (and saves) the reward head
    )


def fp32_trainables(model) -> int:
    """Cast every trainable parameter to fp32 (peft keeps adapters in fp32, but a reward head
    copied by `modules_to_save` from a bf16 base is bf16): optimizer updates of ~1e-5 round away
    in 16 bits. Call before the optimizer is built. Returns how many tensors were cast."""
    import torch

    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


# ---------------------------------------------------------------- device and precision


def device():
    """This process's device, from what Ray allocated to it: its GPU when the task or Train worker
    holds one (Ray narrows CUDA_VISIBLE_DEVICES to it), the CPU otherwise. A GPU that torch cannot
    see is an error at once, not a run on the CPU that would take days."""
    import os

    import torch

    gpus = _ray_gpu_ids()
    if not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"Ray gave this process GPU {gpus}, but torch {torch.__version__} sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch built for CUDA {torch.version.cuda}): "
            "install a CUDA build of torch on the GPU nodes (cluster.yaml's setup_commands), or set the stage's or "
            "eval's GPUs to 0"
        )
    return torch.device("cuda", torch.cuda.current_device())


def _ray_gpu_ids() -> list:
    try:
        import ray
    except ImportError:  # bench/gpu_check.py runs where Ray is not installed
        return []
    return ray.get_gpu_ids() if ray.is_initialized() else []


def inference_dtype(dev):
    """Weights for scoring and generation: bf16 on a GPU that has it (fp16 on one that does not),
    fp32 on a CPU, where 16-bit matmuls are ~100x slower."""
    import torch

    if dev.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- token ids


def uses_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def hh_messages(prompt: str) -> list[dict]:
    """An HH-format transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...", the form every source's
    prompt takes) as chat messages, the open assistant turn it ends with left out. Consecutive
    turns of one role are joined: chat templates such as Llama-2's demand alternation."""
    import re

    parts = re.split(r"\n\n(Human|Assistant):", prompt)  # [before, role, text, role, text, ...]
    turns = [("user", parts[0])] + [("user" if r == "Human" else "assistant", t) for r, t in zip(parts[1::2], parts[2::2])]
    messages: list[dict] = []
    for role, text in turns:
        text = text.strip()
        if not text:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def hh_text(messages: list[dict]) -> str:
    """Chat messages back to an HH transcript ending with the open assistant turn (the form reward
    models and judges read)."""
    turns = "".join(f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}" for m in messages if m["role"] != "system")
    return turns + ASSISTANT


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _lead(tok, ids: list[int]) -> int:
    """How many special tokens open `ids` (BOS, or a chat template's): a cut prompt keeps them."""
    special = set(tok.all_special_ids)
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def _keep_end(tok, ids: list[int], n: int) -> list[int]:
    if len(ids) <= n:
        return ids
    lead = min(_lead(tok, ids), n - 1)
    return ids[:lead] + ids[len(ids) - (n - lead) :]


def encode_prompt(tok, prompt: str, max_prompt_length: int) -> list[int]:
    """The ids a model reads before answering: through its chat template when it has one (with the
    generation prompt), else the text with the tokenizer's special tokens (Llama's <s>, OPT's </s>),
    as TRL tokenizes prompts; cut to keep its opening special tokens and its end."""
    if uses_chat_template(tok):
        text = tok.apply_chat_template(hh_messages(prompt), tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    return _keep_end(tok, ids, max_prompt_length)


def encode_pair(tok, prompt: str, response: str, max_length: int, max_prompt_length: int) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, response) exactly as TRL's SFT and DPO trainers tokenize a pair —
    the prompt and prompt + response + EOS tokenized whole (with the tokenizer's special tokens),
    or both rendered by the chat template, the response being what follows their common prefix —
    then cut to fit: the prompt to `max_prompt_length` keeping its opening special tokens and its
    end (the turn being answered), the response to what is left of `max_length` keeping its start.
    Stages train on these ids and eval scores them, so the two always see the same tokens."""
    if uses_chat_template(tok):
        messages = hh_messages(prompt)
        head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        whole = tok.apply_chat_template(messages + [{"role": "assistant", "content": response.strip()}], tokenize=False)
        p, full = (tok(t, add_special_tokens=False)["input_ids"] for t in (head, whole))
    else:
        p, full = tok(prompt)["input_ids"], tok(prompt + response + tok.eos_token)["input_ids"]
    n = common_prefix(p, full)
    p, r = _keep_end(tok, full[:n], max_prompt_length), full[n:]
    return p, r[: max(1, max_length - len(p))]


def reward_ids(tok, prompt: str, response: str, max_length: int, max_prompt_length: int) -> list[int]:
    """A decoder reward model's row: the pair as `encode_pair` cuts it, always ending with EOS,
    where the model reads its score (training and judging alike)."""
    p, r = encode_pair(tok, prompt, response, max_length, max_prompt_length)
    if r[-1] != tok.eos_token_id:
        r = r[: max(0, max_length - len(p) - 1)] + [tok.eos_token_id]
    return p + r


# ---------------------------------------------------------------- scoring and generation


def run_batched(fn, items: list, batch_size: int) -> list:
    """`fn(batch) -> list` over `items` in batches of `batch_size`, halving the batch (down to 1)
    after a CUDA out-of-memory error and retrying it: the eval's batch size is a ceiling sized for
    the device, not a promise that every GPU holds it."""
    import torch

    out: list = []
    start = 0
    while start < len(items):
        batch = items[start : start + batch_size]
        try:
            out += fn(batch)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            torch.cuda.empty_cache()
            batch_size //= 2
            continue
        start += len(batch)
    return out


def response_logprobs(model, tok, pairs, spec) -> tuple[list[float], list[int]]:
    """Summed log-prob of each response (with the EOS it was trained with) given its prompt, and
    its token count, in right-padded batches on the model's device."""
    import torch

    model.eval()
    dev = model.device

    def score(batch):
        rows = [encode_pair(tok, p, r, spec.max_length, spec.max_prompt_length) for p, r in batch]
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (p, r) in enumerate(rows):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            mask[i, :n] = 1
            target[i, len(p) : n] = True
        ids, mask, target = ids.to(dev), mask.to(dev), target.to(dev)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * target[:, 1:]
        return list(zip(logp.sum(-1).tolist(), target[:, 1:].sum(-1).tolist()))

    out = run_batched(score, list(pairs), spec.batch_size)
    return [s for s, _ in out], [int(c) for _, c in out]


class GenerationLog:
    """Generated tokens and seconds in this process (eval reports its throughput from them), and,
    while an evaluation keeps a scratch folder (`start(folder)`), its finished answers: an evaluation
    retried after its node or task died answers only the prompts it had not answered (one line
    per answer, appended and flushed per batch). Greedy answers resume exactly; a sampled one
    draws from the random state of the retry for the prompts still open."""

    def __init__(self):
        self.start(None)

    def start(self, scratch) -> None:
        import json

        self.scratch = Path(scratch) if scratch else None  # lm-eval keeps its request cache there too
        self.path = self.scratch / "generations.jsonl" if scratch else None
        self.tokens, self.seconds, self.done = 0, 0.0, {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the crash
                    continue
                self.done[row["k"]] = row["text"]

    def key(self, ids: list[int], g, seed: int) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps([ids, g.model_dump(mode="json"), seed]).encode()).hexdigest()[:24]

    def keep(self, keys: list[str], texts: list[str]) -> None:
        import json
        import os

        if self.path is None:  # no evaluation keeps answers: the next model must not read these
            return
        self.done.update(zip(keys, texts))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"k": k, "text": t}) + "\n" for k, t in zip(keys, texts)))
            f.flush()
            os.fsync(f.fileno())


GENERATION = GenerationLog()


def generate(model, tok, prompts: list[str], g, max_prompt_length: int, seed: int = 0) -> list[str]:
    """Batched decoding on the model's device (prompts encoded as training encodes them, left-
    padded); each answer is cut at the first of `g.stop` (where the model starts the next dialogue
    turn). Sampling is seeded."""
    import time

    import torch

    model.eval()
    torch.manual_seed(seed)
    dev = model.device
    rows = [encode_prompt(tok, p, max_prompt_length) for p in prompts]
    # Repeated prompts (rank and ai_feedback sample each prompt twice) are told apart by position.
    keys = [GENERATION.key(ids + [-i], g, seed) for i, ids in enumerate(rows)]
    todo = [i for i, k in enumerate(keys) if k not in GENERATION.done]

    def decode(batch):  # positions in `prompts`
        chosen = [rows[i] for i in batch]
        width = max(map(len, chosen))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(b)) + b for b in chosen], device=dev)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in chosen], device=dev)
        start = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=g.max_new_tokens,
                do_sample=g.do_sample,
                temperature=g.temperature,
                top_p=g.top_p,
                top_k=g.top_k,
                no_repeat_ngram_size=g.no_repeat_ngram_size,
                repetition_penalty=g.repetition_penalty,
                min_length=g.min_length,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        GENERATION.seconds += time.perf_counter() - start
        new = gen[:, width:]
        GENERATION.tokens += int((new != tok.pad_token_id).sum())
        outs = []
        for row in new:
            text = tok.decode(row, skip_special_tokens=True)
            for stop in g.stop:
                text = text.split(stop)[0]
            outs.append(text.strip())
        GENERATION.keep([keys[i] for i in batch], outs)
        return outs

    new = dict(zip([keys[i] for i in todo], run_batched(decode, todo, g.batch_size)))
    return [new[k] if k in new else GENERATION.done[k] for k in keys]


def encoder_pair_ids(tok, prompt: str, response: str, limit: int, max_prompt_length: int) -> list[int]:
    """An encoder reward model's row (OpenAssistant's DeBERTa: `[CLS] prompt [SEP] answer [SEP]`),
    always within `limit` tokens with its special tokens: the pair exactly as the tokenizer encodes
    pairs when it fits; else the prompt keeps its end (the turn being answered) and the answer its
    start. A long answer leaves the prompt min(max_prompt_length, half the room); the prompt takes
    whatever room a short answer leaves. (Truncating only the prompt fails on an answer longer
    than the limit: "Sequence to truncate too short".)"""
    backend = tok.backend_tokenizer  # the `tokenizers` pipeline that `tok(prompt, response)` runs
    p, a = (backend.encode(t, add_special_tokens=False) for t in (prompt, response))
    room = limit - tok.num_special_tokens_to_add(pair=True)
    keep_a = min(len(a), room - min(len(p), max_prompt_length, room // 2))
    keep_p = min(len(p), room - keep_a)
    if keep_p < len(p):
        p.truncate(keep_p, direction="left")
    if keep_a < len(a):
        a.truncate(keep_a, direction="right")
    return backend.post_process(p, a, add_special_tokens=True).ids


def reward_scores(model, tok, prompts: list[str], responses: list[str], batch_size: int, max_length: int, max_prompt_length: int):
    """The reward model's scalar for each (prompt, response), in batches on its device, each text
    tokenized by the reward model's own tokenizer. A decoder (a `reward` stage's model) reads
    `reward_ids`, cut as training cuts them; an encoder with a separator token (OpenAssistant's
    DeBERTa reward model) reads `encoder_pair_ids`, within its position limit too; an OpenAssistant
    Pythia reward model (its tokenizer has <|prompter|>) reads its chat format, `oasst_chat_ids`."""
    from functools import partial

    import numpy as np
    import torch

    dev = model.device
    limit = min(max_length, tok.model_max_length, getattr(model.config, "max_position_embeddings", max_length))
    if "<|prompter|>" in tok.get_vocab():  # an OpenAssistant decoder reads its chat format
        encode = partial(oasst_chat_ids, tok, limit=limit)
    elif tok.sep_token is not None:
        encode = partial(encoder_pair_ids, tok, limit=limit, max_prompt_length=max_prompt_length)
    else:
        encode = partial(reward_ids, tok, max_length=max_length, max_prompt_length=max_prompt_length)

    def score(batch):
        rows = [encode(p, r) for p, r in batch]
        width = max(map(len, rows))
        # Right padding (as an encoder's tokenizer pads): a decoder's classifier reads the last token before the first pad.
        ids = torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        with torch.no_grad():
            return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, 0].float().tolist()

    return np.array(run_batched(score, list(zip(prompts, responses)), batch_size))


# DeepSpeed ZeRO presets a stage names with `deepspeed: zero2 | zero3 | zero3_offload`. Every
# "auto" is filled by transformers from the stage's TrainingArguments (batch size, grad_accum,
# lr, weight decay, max_grad_norm, bf16) and the model's hidden size (bucket sizes), so one
# preset fits every model and stage. There is no "scheduler" block on purpose: without it
# transformers keeps the stage's own `lr_scheduler` and warmup; a DeepSpeed scheduler would
# replace them. The optimizer block is there so that ZeRO-Offload steps with DeepSpeed's CPU Adam.
# Without offload DeepSpeed's AdamW is its FusedAdam, which on a CPU is a C++ op compiled on first
# use (~2 min on 2 cores): a CPU stage (`cpu=True`) steps with torch's AdamW instead (`torch_adam`).
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")


def deepspeed_config(value, check_installed: bool = False, cpu: bool = False) -> dict | None:
    """The DeepSpeed config for a stage's `deepspeed` field: a preset name gives its dict, a path
    its JSON file (loaded), a dict is passed through, None stays None. `check_installed` (set
    when a stage is about to run) fails early, and clearly, when DeepSpeed is not installed:
    transformers' own error there is a PackageNotFoundError that suggests upgrading transformers."""
    if value is None:
        return None
    if check_installed:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            asked = f"deepspeed: {value}" if isinstance(value, str) else "an inline deepspeed config"
            raise ImportError(f"the stage asks for {asked}, but DeepSpeed is not installed here: pip install 'farm[deepspeed]'")
    if isinstance(value, dict):
        return value
    if value in DEEPSPEED_PRESETS:
        return _deepspeed_preset(value, cpu)
    return _deepspeed_file(value)


def _deepspeed_preset(name: str, cpu: bool = False) -> dict:
    zero = {
        "stage": 3 if name.startswith("zero3") else 2,
        "overlap_comm": True,  # reduce gradients while the backward pass goes on
        "contiguous_gradients": True,  # fewer copies and less fragmentation
        "reduce_bucket_size": "auto",
    }
    if zero["stage"] == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Gather the partitioned weights when the model is saved: the artifact must be a
            # whole model that the next stage and eval load without DeepSpeed.
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if name == "zero3_offload":  # optimizer state and parameters in (pinned) host memory
        zero |= {
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
        }
    adamw = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    if cpu and "offload_optimizer" not in zero:  # (offload keeps DeepSpeed's CPU Adam, which ZeRO-Offload requires)
        adamw["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": adamw},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def _deepspeed_file(path) -> dict:
    import json

    file = Path(path).expanduser()
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"deepspeed config {str(path)!r} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"deepspeed config {str(path)!r}: {not_utf8(e)}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed config {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"deepspeed config {str(path)!r} must hold a JSON object, not {type(doc).__name__}")
    return doc


# ---------------------------------------------------------------- the study file's `model:`


class ModelSpec(Strict):
    base: str = "tiny-gpt2"  # a built model name, a hub id, or a local path
    paths: ClassVar[tuple[str, ...]] = ("base", "tokenizer")
    config: dict[str, Any] = {}  # architecture overrides for a built model
    tokenizer: str | None = None  # farm-bpe | gpt2 | hub id | path; default: the base's own
    trust_remote_code: bool = False  # run code shipped with a hub model: only when the study says so
    # Prompt a model whose tokenizer has a chat template (Llama-2-chat) through it, in training and
    # in evaluation alike; false renders the raw HH transcript instead.
    chat_template: bool = True
    # The commit (or branch, tag) of a hub base, and of a hub tokenizer from another repository (a
    # tokenizer of the base's repository is read at `revision`); default: the default branch, which
    # `farm plan` and `farm run` pin to its commit before planning (farm.preflight.pin).
    revision: str | None = None
    tokenizer_revision: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        built = self.base in BUILT_MODELS
        if not (built or looks_like_path(self.base) or "/" in self.base or self.base in LEGACY_HUB_MODELS):
            raise ValueError(
                f"base: unknown model {self.base!r}; give a built model ({', '.join(BUILT_MODELS)}), "
                f"a hub id (owner/name, or {', '.join(LEGACY_HUB_MODELS)}) or a local path (./..., /...)"
            )
        if self.config and not built:
            raise ValueError(f"config applies only to built models ({', '.join(BUILT_MODELS)})")
        if built and self.tokenizer is None:
            object.__setattr__(self, "tokenizer", "farm-bpe")
        if self.revision and not hub_models({"base": self.base}):
            raise ValueError(f"revision: pins the commit of a hub model, and base {self.base!r} is not one (remove revision)")
        if self.tokenizer_revision and self.tokenizer in (None, self.base):
            raise ValueError("tokenizer_revision: the tokenizer is the base's own, read at revision; give that instead")
        if self.tokenizer_revision and not hub_models({"tokenizer": self.tokenizer}):
            raise ValueError(f"tokenizer_revision: pins the commit of a hub tokenizer, and tokenizer {self.tokenizer!r} is not one (remove it)")
        for field in ("base", "tokenizer"):
            value = getattr(self, field)
            if value and looks_like_path(value) and not Path(value).expanduser().exists():
                raise ValueError(f"{field}: path {value!r} does not exist")
            if value and looks_like_path(value) and (problem := local_model_problem(Path(value).expanduser())):
                raise ValueError(f"{field}: {problem}")
        return self
