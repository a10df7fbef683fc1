from farm.models import FARM_BPE_VOCAB, ModelSpec, base_model, bundled_corpus, load_tokenizer, lora_config, train_bpe
from farm.schema import LoRA


def test_bundled_gpt2_tokenizer_matches_gpt2():
    tok = load_tokenizer("gpt2")
    assert len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" The quick brown fox jumps over the lazy dog.")["input_ids"] == [383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    assert tok.eos_token_id == 50256


def test_farm_bpe_is_small_and_round_trips():
    tok = load_tokenizer("farm-bpe")
    assert len(tok) == FARM_BPE_VOCAB
    text = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water and yeast."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2
    assert tok.pad_token_id != tok.eos_token_id


def test_shipped_farm_bpe_is_reproducible_from_the_bundled_text():
    rebuilt = train_bpe(bundled_corpus())
    assert rebuilt.get_vocab() == load_tokenizer("farm-bpe").get_vocab()


def test_tiny_model_is_built_from_config_and_seeded():
    spec = ModelSpec(config={"n_layer": 1, "n_embd": 32, "n_head": 2})
    m1, tok = base_model(spec, seed=3)
    m2, _ = base_model(spec, seed=3)
    m3, _ = base_model(spec, seed=4)
    assert m1.config.vocab_size == len(tok) and m1.config.n_layer == 1
    w1, w2, w3 = (m.transformer.wte.weight for m in (m1, m2, m3))
    assert (w1 == w2).all() and not (w1 == w3).all()


def test_lora_targets_gpt2_conv1d_layers():
    model, _ = base_model(ModelSpec(config={"n_layer": 1, "n_embd": 32, "n_head": 2}), seed=0)
    cfg = lora_config(LoRA(r=4), model)
    assert set(cfg.target_modules) == {"c_attn", "c_proj"} and cfg.fan_in_fan_out and cfg.r == 4
