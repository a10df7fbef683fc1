"""Models and tokenizers: a hub id or local path (clusters), or a tiny GPT-2 built from a config
(the embedded default) with the farm's own small byte-level BPE tokenizer; LoRA via peft."""

from __future__ import annotations

from pathlib import Path

from farm.data.sources import asset_path

EOS, PAD = "<|endoftext|>", "<|pad|>"
TINY_GPT2 = dict(n_layer=2, n_embd=128, n_head=4, n_positions=256)
FARM_BPE_VOCAB = 4096
# LoRA targets for architectures whose module names peft cannot guess well.
LORA_TARGETS = {"gpt2": (["c_attn", "c_proj"], True), "llama": (["q_proj", "k_proj", "v_proj", "o_proj"], False)}


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
    from farm.spec import SourceSpec
    from farm.data.records import convert
    from farm.data.sources import load_source

    texts = []
    for spec in (SourceSpec(name="hh_rlhf"), SourceSpec(name="lima")):
        records = load_source(spec)
        texts += [t.text for t in convert(records, "text")]
        texts += [r.rejected for r in records if hasattr(r, "rejected")]
    return texts


def load_tokenizer(name: str, trust_remote_code: bool = False):
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
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def base_model(spec, seed: int):
    """(model, tokenizer) for a study's `model` section, before any stage has trained it."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(spec.tokenizer or spec.base, spec.trust_remote_code)
    if spec.base == "tiny-gpt2":
        cfg = GPT2Config(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **{**TINY_GPT2, **spec.config},
        )
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg), tok
    model = AutoModelForCausalLM.from_pretrained(spec.base, trust_remote_code=spec.trust_remote_code)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    return model, tok


def load_artifact(path: str | Path):
    """(model, tokenizer) saved by a stage (a plain HF model folder with its tokenizer), or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:  # a hub model named as a generator may have none
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(str(path)), tok


def load_reward_model(path_or_id: str | Path):
    """(reward model, tokenizer): a sequence classifier with one output, saved by a `reward`
    stage or from the hub (e.g. OpenAssistant's reward models)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path_or_id))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(path_or_id))
    if model.config.pad_token_id is None:  # a decoder finds each row's last token by the pad id
        model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


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


# DeepSpeed ZeRO presets a stage names with `deepspeed: zero2 | zero3 | zero3_offload`. Every
# "auto" is filled by transformers from the stage's TrainingArguments (batch size, grad_accum,
# lr, weight decay, max_grad_norm, bf16) and the model's hidden size (bucket sizes), so one
# preset fits every model and stage. There is no "scheduler" block on purpose: without it
# transformers keeps the stage's own `lr_scheduler` and warmup; a DeepSpeed scheduler would
# replace them. The optimizer block is there so that ZeRO-Offload steps with DeepSpeed's CPU Adam.
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")


def deepspeed_config(value, check_installed: bool = False) -> dict | None:
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
        return _deepspeed_preset(value)
    return _deepspeed_file(value)


def _deepspeed_preset(name: str) -> dict:
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
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
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
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"deepspeed config {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"deepspeed config {str(path)!r} must hold a JSON object, not {type(doc).__name__}")
    return doc
