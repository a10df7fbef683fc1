"""Tiny random models of the real architectures the paper profiles use, saved as ordinary HF model folders.

`tiny_model_dir(kind)` returns a local folder that `model.base` can point at exactly as a user points at a
downloaded hub snapshot: config.json, generation_config.json, model.safetensors and tokenizer files, each
kind with its tokenizer's real quirks (small vocabularies trained on the bundled HH text, so everything
runs in seconds on a CPU):

- `llama`      Llama-2-7b-chat-hf in miniature: LlamaForCausalLM, 2 layers, hidden 64, 4 heads, 2 key-value
               heads (GQA), fp16 weights, `torch_dtype: float16`. SentencePiece-style BPE (Metaspace,
               prepend scheme "first", byte fallback <0x00>..<0xFF> at ids 3..258), `<unk>`=0, `<s>`=1,
               `</s>`=2, `<s>` prepended to every text, no EOS appended, NO pad token, tokenizer class
               `LlamaTokenizer`, the Llama-2-chat `[INST] ... [/INST]` / `<<SYS>>` chat template (which itself
               starts with `<s>`: tokenizing its output with special tokens on gives two BOS).
               generation_config as the hub's: do_sample, temperature 0.6, top_p 0.9, pad_token_id 0.
- `llama-base` the same as Llama-2-7b-hf: no chat template.
- `opt`        facebook/opt-1.3b in miniature: OPTForCausalLM, fp16, `torch_dtype: float16`, config vocab_size
               padded above the tokenizer's length (as OPT's 50272 vs 50265). Byte-level BPE shipped as
               vocab.json + merges.txt only (no tokenizer.json, as the hub folder), `GPT2Tokenizer` with
               `add_bos_token`: `</s>` (id 2) is BOS and EOS and is prepended to every text, no EOS appended,
               `<s>`=0, `<pad>`=1 (the pad token), `<unk>`=3 in the vocabulary but unk_token `</s>` (as OPT's).
- `gpt2`       openai-community/gpt2 in miniature: GPT2LMHeadModel, n_positions 512; byte-level BPE with
               `<|endoftext|>` as bos = eos = unk, no pad token, no special tokens added. Like the hub's gpt2,
               its config names no dtype and its weights are float32.

Building is deterministic (same bytes each time) and takes a few seconds; folders are cached under
`$FARM_TEST_CACHE/tiny-models/<hash>/<kind>` (default `~/.cache/farm-tests`, or `$XDG_CACHE_HOME/farm-tests`),
where <hash> covers this file's source, the corpus and the library versions, and each folder appears
atomically (built in a temporary folder, then renamed), so parallel test processes never see a half-written one.

    from tiny_models import tiny_model_dir        # tests/ is on sys.path under pytest
    path = tiny_model_dir("llama")

`python tests/tiny_models.py [KIND ...]` builds and prints the folders (e.g. to carry them to another machine).
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

try:
    import pytest
except ImportError:  # `python tiny_models.py` on a machine without pytest
    pytest = None

KINDS = ("llama", "llama-base", "opt", "gpt2")
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "farm" / "assets" / "hh_rlhf" / "harmless-base-test.jsonl.gz"
CORPUS_RECORDS = 600  # the first N transcripts (chosen + rejected): enough for a ~1k vocabulary, trains in ~1 s

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json "chat_template", verbatim (Jinja; `\n` inside its
# string literals are Jinja escapes, hence the raw string).
LLAMA2_CHAT_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    r"{% endfor %}"
)
HUGE = 1000000000000000019884624838656  # transformers' "no limit" model_max_length, as hub configs spell it


# ---------------------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    base = os.environ.get("FARM_TEST_CACHE")
    if base:
        return Path(base) / "tiny-models"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "farm-tests" / "tiny-models"


@functools.lru_cache(maxsize=None)
def builder_hash() -> str:
    """Changes whenever what a build produces could: this file, the corpus, the libraries that serialize."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(hashlib.sha256(CORPUS.read_bytes()).digest())
    h.update(f"{transformers.__version__} {tokenizers.__version__} {torch.__version__}".encode())
    return h.hexdigest()[:16]


def tiny_model_dir(kind: str) -> Path:
    """The cached folder of a tiny model of `kind` (one of KINDS), built on first use."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; one of {', '.join(KINDS)}")
    parent = cache_root() / builder_hash()
    final = parent / kind
    if (final / "config.json").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{kind}.lock", "w") as lock:  # one builder per kind; the others wait, then reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "config.json").is_file():
            return final
        if final.exists():  # not made by this function (which renames only complete folders): rebuild
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=parent))
        tmp.chmod(0o755)
        try:
            build(kind, tmp)
            os.rename(tmp, final)  # atomic: readers see no folder or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if (final / "config.json").is_file():  # another builder (without the lock, e.g. NFS) won
                return final
            raise
    return final


def tiny_models():
    """A session fixture for tests: `tiny_models("llama")` -> Path. Import it into a test module
    (`from tiny_models import tiny_models`) or a conftest."""
    return tiny_model_dir


if pytest is not None:
    tiny_models = pytest.fixture(scope="session")(tiny_models)


# ---------------------------------------------------------------------------------------------- build


def corpus() -> list[str]:
    texts = []
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= CORPUS_RECORDS:
                break
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    return texts


def build(kind: str, out: Path) -> None:
    """Write the folder of `kind` into the existing, empty folder `out`."""
    import torch

    torch.manual_seed(0)
    if kind in ("llama", "llama-base"):
        _build_llama(out, chat=kind == "llama")
    elif kind == "opt":
        _build_opt(out)
    elif kind == "gpt2":
        _build_gpt2(out)
    else:
        raise ValueError(kind)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def _added(content: str) -> dict:
    return dict(content=content, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)


def _save_model(model, out: Path, dtype, generation: dict) -> None:
    """Save weights in `dtype` (None: float32 and no dtype in config.json, as the hub's gpt2) + configs."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    # Hub configs written by transformers 4.x say `torch_dtype`; transformers 5 reads it as `dtype`.
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_json(out / "config.json", dict(sorted(cfg.items())))
    _write_json(out / "generation_config.json", generation)
    assert dtype is None or all(p.dtype == dtype for p in model.parameters())


# --- Llama-2 ------------------------------------------------------------------------------------------

LLAMA_PIECES = 1024  # trained pieces (incl. the 3 specials), on top of the 256 byte-fallback tokens
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def _llama_tokenizer():
    """A Llama-2-style tokenizers.Tokenizer: BPE with byte fallback over Metaspace ("▁") pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    # Train on whitespace-split words (SentencePiece never merges across words) ...
    trainee = Tokenizer(models.BPE(unk_token="<unk>"))
    trainee.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_PIECES + len(BYTE_TOKENS),
        special_tokens=specials + BYTE_TOKENS,  # ids 0..258 as in Llama's vocabulary
        limit_alphabet=100,  # rarer characters are spelt with byte tokens, as in Llama
        show_progress=False,
    )
    trainee.train_from_iterator(corpus(), trainer=trainer)
    trained = json.loads(trainee.to_str())["model"]
    vocab, merges = trained["vocab"], [tuple(m) for m in trained["merges"]]
    assert [vocab[t] for t in specials + BYTE_TOKENS] == list(range(259))
    # ... and encode as the converted Llama-2 tokenizer does: one unsplit sequence, "▁" prepended once.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok


def _build_llama(out: Path, chat: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _llama_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    config = dict(
        add_bos_token=True,
        add_eos_token=False,
        added_tokens_decoder={str(i): _added(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])},
        bos_token="<s>",
        clean_up_tokenization_spaces=False,
        eos_token="</s>",
        legacy=False,
        model_max_length=HUGE,
        pad_token=None,
        padding_side="right",
        sp_model_kwargs={},
        tokenizer_class="LlamaTokenizer",
        unk_token="<unk>",
    )
    if chat:
        config["chat_template"] = LLAMA2_CHAT_TEMPLATE
    _write_json(out / "tokenizer_config.json", dict(sorted(config.items())))
    _write_json(
        out / "special_tokens_map.json",
        {f"{k}_token": {n: v for n, v in _added(t).items() if n != "special"} for k, t in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"))},
    )

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        use_cache=True,
    )
    model = LlamaForCausalLM(cfg)
    generation = dict(bos_token_id=1, do_sample=True, eos_token_id=2, max_length=512, pad_token_id=0, temperature=0.6, top_p=0.9)
    _save_model(model, out, torch.float16, generation)


# --- byte-level BPE (OPT, GPT-2) -------------------------------------------------------------------------


def _byte_level_bpe(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def _write_vocab_merges(tok, out: Path) -> None:
    """vocab.json + merges.txt in the layout of the GPT-2 / OPT hub folders."""
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted((tok.get_vocab(with_added_tokens=True)).items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _build_opt(out: Path) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT's (fairseq/RoBERTa) dictionary
    tok = _byte_level_bpe(specials, 1000)
    _write_vocab_merges(tok, out)  # facebook/opt-1.3b ships no tokenizer.json
    config = dict(
        add_bos_token=True,
        add_prefix_space=False,
        added_tokens_decoder={"1": _added("<pad>"), "2": _added("</s>")},
        bos_token="</s>",
        eos_token="</s>",
        errors="replace",
        model_max_length=HUGE,
        pad_token="<pad>",
        tokenizer_class="GPT2Tokenizer",
        unk_token="</s>",
    )
    _write_json(out / "tokenizer_config.json", dict(sorted(config.items())))
    _write_json(
        out / "special_tokens_map.json",
        dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="</s>"),
    )
    n = tok.get_vocab_size()
    cfg = OPTConfig(
        vocab_size=(n // 16 + 1) * 16,  # OPT pads its embedding past the tokenizer (50272 vs 50265)
        hidden_size=64,
        word_embed_proj_dim=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        do_layer_norm_before=True,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        enable_bias=True,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        prefix="</s>",
        tie_word_embeddings=True,
    )
    model = OPTForCausalLM(cfg)
    _save_model(model, out, torch.float16, dict(bos_token_id=2, eos_token_id=2, pad_token_id=1))


def _build_gpt2(out: Path) -> None:
    from tokenizers import AddedToken
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = "<|endoftext|>"
    tok = _byte_level_bpe([], 999)
    # As in GPT-2's vocabulary, <|endoftext|> comes last (50256 there, 999 here), after the merges.
    tok.add_special_tokens([AddedToken(eos, normalized=False, special=True)])
    _write_vocab_merges(tok, out)  # the hub's gpt2 folder has vocab.json + merges.txt and tokenizer.json
    tok.save(str(out / "tokenizer.json"))
    config = dict(
        add_prefix_space=False,
        added_tokens_decoder={str(tok.token_to_id(eos)): _added(eos)},
        bos_token=eos,
        eos_token=eos,
        model_max_length=512,
        tokenizer_class="GPT2Tokenizer",
        unk_token=eos,
    )
    _write_json(out / "tokenizer_config.json", dict(sorted(config.items())))
    e = tok.token_to_id(eos)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=e,
        eos_token_id=e,
    )
    model = GPT2LMHeadModel(cfg)
    _save_model(model, out, None, dict(bos_token_id=e, eos_token_id=e))


if __name__ == "__main__":
    for kind in sys.argv[1:] or KINDS:
        print(kind, tiny_model_dir(kind))
