"""The tiny model fixtures (tests/tiny_models.py) keep the quirks of the hub models they stand for."""

import json
import os

import pytest
from tiny_models import KINDS, builder_hash, cache_root, tiny_model_dir

NON_ASCII = "naïve café — 你好"


@pytest.fixture(scope="module")
def loaded():
    """(tokenizer, model, config) per kind, loaded once, exactly as a user's hub snapshot is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def load(kind):
        if kind not in cache:
            path = str(tiny_model_dir(kind))
            cache[kind] = (
                AutoTokenizer.from_pretrained(path, local_files_only=True),
                AutoModelForCausalLM.from_pretrained(path, local_files_only=True),
                AutoConfig.from_pretrained(path, local_files_only=True),
            )
        return cache[kind]

    return load


@pytest.mark.parametrize("kind", KINDS)
def test_loads_offline_and_runs(kind, loaded):
    import torch

    tok, model, config = loaded(kind)
    path = tiny_model_dir(kind)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in path.iterdir()}
    assert (
        type(model).__name__
        == {"llama": "LlamaForCausalLM", "llama-base": "LlamaForCausalLM", "opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind]
    )
    # transformers 5 loads dtype="auto": Llama-2 and OPT arrive in fp16, GPT-2 (no dtype in its config) in fp32.
    want = torch.float32 if kind == "gpt2" else torch.float16
    raw = json.loads((path / "config.json").read_text())
    assert raw.get("torch_dtype") == (None if kind == "gpt2" else "float16")
    assert config.dtype in ((None, torch.float32) if kind == "gpt2" else (torch.float16, "float16"))
    assert {p.dtype for p in model.parameters()} == {want}
    # Not the empty-tokenizer trap: real text becomes many in-vocabulary ids.
    ids = tok(NON_ASCII + " Hello world")["input_ids"]
    assert len(ids) > 5 and max(ids) < config.vocab_size and len(tok) <= config.vocab_size
    assert 1000 <= len(tok) <= 2000
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_round_trips_non_ascii(kind, loaded):
    tok = loaded(kind)[0]
    for text in (NON_ASCII, "Hello world", "line one\nline two  (two spaces)"):
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("kind", ["llama", "llama-base"])
def test_llama_tokenizer_quirks(kind, loaded):
    tok, model, config = loaded(kind)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token is None and tok.pad_token_id is None  # Llama-2 has no pad token
    ids = tok("Hello")["input_ids"]
    assert ids[0] == 1 and ids[-1] != 2 and 1 not in ids[1:]  # BOS prepended, no EOS appended
    assert tok.convert_ids_to_tokens(ids)[1].startswith("▁")  # SentencePiece word start, prepended once
    assert tok.convert_ids_to_tokens(tok("你好")["input_ids"])[2:] == [  # byte fallback for unseen characters
        "<0xE4>",
        "<0xBD>",
        "<0xA0>",
        "<0xE5>",
        "<0xA5>",
        "<0xBD>",
    ]
    # GQA shapes: 4 query heads, 2 key-value heads of width 16.
    assert (config.num_attention_heads, config.num_key_value_heads, config.hidden_size) == (4, 2, 64)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64) and attn.k_proj.weight.shape == (32, 64)
    assert not config.tie_word_embeddings and config.pad_token_id is None
    # The hub's generation_config samples by default and names a pad id the tokenizer lacks.
    gen = model.generation_config
    assert gen.do_sample and (gen.temperature, gen.top_p, gen.pad_token_id) == (0.6, 0.9, 0)
    assert (tok.chat_template is not None) == (kind == "llama")


def test_llama_chat_template(loaded):
    tok = loaded("llama")[0]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s>[INST] Hi [/INST]"
    text = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": " Hello. "},
            {"role": "user", "content": "Bye\n"},
        ],
        tokenize=False,
    )
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    # The trap the real one sets: the template writes <s> itself, so tokenizing its text with special
    # tokens on gives two BOS; add_special_tokens=False (what apply_chat_template does) gives one.
    chat = "<s>[INST] Hi [/INST]"
    assert tok(chat)["input_ids"][:2] == [1, 1]
    assert tok(chat, add_special_tokens=False)["input_ids"][:2] != [1, 1]
    templated = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, return_dict=False)
    assert templated[0] == 1 and templated[1] != 1


def test_opt_tokenizer_quirks(loaded):
    tok, model, config = loaded("opt")
    path = tiny_model_dir("opt")
    assert not (path / "tokenizer.json").exists()  # as facebook/opt-1.3b: vocab.json + merges.txt only
    assert type(tok).__name__ == "GPT2Tokenizer"
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("</s>", "</s>", "<pad>", "</s>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == 2 and 2 not in ids[1:] and 0 not in ids  # </s> prepended as BOS, nothing appended
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == ids[1:]
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 2, 1)
    assert config.vocab_size > len(tok)  # OPT's embedding is padded past its tokenizer (50272 vs 50265)
    assert config.tie_word_embeddings and config.num_attention_heads == 4 and config.ffn_dim == 128
    assert tok.chat_template is None
    assert model.generation_config.pad_token_id == 1


def test_gpt2_tokenizer_quirks(loaded):
    tok, model, config = loaded("gpt2")
    eot = "<|endoftext|>"
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == (eot, eot, eot)
    assert tok.pad_token is None
    assert tok.eos_token_id == len(tok) - 1 == config.eos_token_id == config.bos_token_id  # last id, as 50256
    for text in ("Hello world", NON_ASCII):
        assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # adds nothing
    assert tok(" Hello")["input_ids"] != tok("Hello")["input_ids"]  # no prefix space: "ĠHello" vs "Hello"
    assert tok.chat_template is None
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (2, 64, 4, 512)


def test_cache_is_keyed_atomic_and_deterministic(tmp_path, monkeypatch):
    default = tiny_model_dir("gpt2")
    assert default == tiny_model_dir("gpt2") == cache_root() / builder_hash() / "gpt2"
    monkeypatch.setenv("FARM_TEST_CACHE", str(tmp_path))
    fresh = tiny_model_dir("gpt2")  # a second build, elsewhere: the same bytes
    assert fresh == tmp_path / "tiny-models" / builder_hash() / "gpt2"
    assert sorted(os.listdir(fresh)) == sorted(os.listdir(default))
    for name in os.listdir(default):
        assert (fresh / name).read_bytes() == (default / name).read_bytes(), name
    # Only finished folders (and lock files) are left: the temporary build folder was renamed.
    assert sorted(os.listdir(fresh.parent)) == [".gpt2.lock", "gpt2"]
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        tiny_model_dir("llama-3")
