"""The model repositories the paper profiles load, as tiny random models under their real ids.

Each keeps the real repository's architecture class, tokenizer class, special tokens and their ids,
and the quirks the farm meets (no pad token, BOS added, a chat template, a 512-token limit), at
hidden sizes of 32-64, 2 layers and ~1k-token vocabularies trained on the bundled HH text:

- `gpt2`, `meta-llama/Llama-2-7b-hf`, `meta-llama/Llama-2-7b-chat-hf`, `facebook/opt-1.3b`: the folders
  of tests/tiny_models.py (gpt2, llama-base, llama, opt), whose docstring lists their quirks.
- `OpenAssistant/reward-model-deberta-v3-large-v2` (Studies D, E): DebertaV2ForSequenceClassification,
  1 label, relative attention with no absolute positions (`position_biased_input: false`,
  `max_position_embeddings: 512`), `DebertaV2Tokenizer` (a Unigram tokenizer.json; `[PAD]`=0, `[CLS]`=1,
  `[SEP]`=2, `[UNK]`=3, `[MASK]` last) with no `model_max_length` of its own, pairs as
  `[CLS] A [SEP] B [SEP]`.
- `facebook/roberta-hate-speech-dynabench-r4-target` (scorer `roberta_hate`): RobertaForSequenceClassification,
  labels nothate/hate, 514 positions (pad offset), `RobertaTokenizer` from vocab.json + merges.txt
  (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>` last).
- Detoxify "original" (scorer `detoxify`, model `original`): its checkpoint file, which Detoxify fetches with
  `torch.hub` into `$TORCH_HOME/hub/checkpoints/toxic_original-c1212f89.ckpt` (here under `torch_home(cache)`),
  naming its base `bert-base-uncased`, whose config and uncased WordPiece tokenizer (`[PAD]`=0,
  `[unused0..98]`, `[UNK]`=100, `[CLS]`=101, `[SEP]`=102, `[MASK]`=103) Detoxify reads from the hub.

With `HF_HUB_CACHE=<cache>`, `HF_HUB_OFFLINE=1` and `TORCH_HOME=torch_home(cache)` the farm's own loaders read
them by id. `build(cache)` is a no-op when this file, tests/tiny_models.py and the libraries are unchanged
since the last build into `cache`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from hub_mirror import put

DEBERTA_RM = "OpenAssistant/reward-model-deberta-v3-large-v2"
ROBERTA_HATE = "facebook/roberta-hate-speech-dynabench-r4-target"
BERT = "bert-base-uncased"
DETOXIFY_CKPT = "toxic_original-c1212f89.ckpt"  # the file name in detoxify.detoxify.MODEL_URLS["original"]
FROM_TINY = {
    "gpt2": "gpt2",
    "meta-llama/Llama-2-7b-hf": "llama-base",
    "meta-llama/Llama-2-7b-chat-hf": "llama",
    "facebook/opt-1.3b": "opt",
}
MODELS = (*FROM_TINY, DEBERTA_RM, ROBERTA_HATE, BERT)


def torch_home(cache: Path) -> Path:
    """The TORCH_HOME whose hub cache holds the Detoxify checkpoint (Detoxify downloads with torch.hub, not the HF hub)."""
    return Path(cache) / ".torch"


def build(cache: Path) -> None:
    """Write every model repository (and the Detoxify checkpoint) into the hub cache folder `cache`."""
    import tokenizers
    import torch
    import transformers
    from tiny_models import builder_hash, tiny_model_dir

    key = hashlib.sha256(Path(__file__).read_bytes() + builder_hash().encode())
    key.update(f"{transformers.__version__} {tokenizers.__version__} {torch.__version__}".encode())
    marker = Path(cache) / f".farm-models-{key.hexdigest()[:16]}"
    if marker.exists():
        return
    for repo, kind in FROM_TINY.items():
        folder = tiny_model_dir(kind)
        put(cache, "model", repo, {p.name: p for p in folder.iterdir() if p.is_file()})
    with tempfile.TemporaryDirectory() as tmp:
        for repo, builder in ((DEBERTA_RM, _deberta_rm), (ROBERTA_HATE, _roberta_hate), (BERT, _bert_base)):
            out = Path(tmp) / repo.replace("/", "--")
            out.mkdir()
            torch.manual_seed(0)
            builder(out)
            put(cache, "model", repo, {p.name: p for p in out.iterdir() if p.is_file()})
        checkpoints = torch_home(cache) / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(_detoxify_checkpoint(Path(tmp) / BERT / "config.json"), checkpoints / DETOXIFY_CKPT)
    marker.write_text("built\n")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save(model, out: Path) -> None:
    """Weights (float32, as these repositories hold them) and config.json without transformers 5's dtype key."""
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("dtype", None)
    _write_json(out / "config.json", cfg)


def _deberta_rm(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tiny_models import HUGE, corpus
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(vocab_size=1000, special_tokens=specials, unk_token="[UNK]", show_progress=False))
    tok.add_special_tokens(["[MASK]"])  # last, as 128000 in the real vocabulary
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", dict(
        bos_token="[CLS]", cls_token="[CLS]", do_lower_case=False, eos_token="[SEP]", mask_token="[MASK]",
        model_max_length=HUGE, pad_token="[PAD]", sep_token="[SEP]", split_by_punct=False,
        tokenizer_class="DebertaV2Tokenizer", unk_token="[UNK]", vocab_type="spm",
    ))
    _write_json(out / "special_tokens_map.json", dict(bos_token="[CLS]", cls_token="[CLS]", eos_token="[SEP]", mask_token="[MASK]",
                                                      pad_token="[PAD]", sep_token="[SEP]", unk_token="[UNK]"))
    n = tok.get_vocab_size()
    config = DebertaV2Config(
        vocab_size=n + 99,  # the real embedding is larger than the vocabulary too (128100 vs 128001)
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, position_biased_input=False, relative_attention=True,
        pos_att_type=["p2c", "c2p"], position_buckets=256, max_relative_positions=-1, norm_rel_ebd="layer_norm",
        share_att_key=True, type_vocab_size=0, layer_norm_eps=1e-7, pad_token_id=0, num_labels=1,
        architectures=["DebertaV2ForSequenceClassification"],
    )
    _save(DebertaV2ForSequenceClassification(config), out)


def _roberta_hate(out: Path) -> None:
    from tokenizers import AddedToken
    from tiny_models import _byte_level_bpe, _write_vocab_merges
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tok = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"], 1000)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    _write_vocab_merges(tok, out)  # the repository has no tokenizer.json
    specials = dict(bos_token="<s>", cls_token="<s>", eos_token="</s>", mask_token="<mask>", pad_token="<pad>", sep_token="</s>", unk_token="<unk>")
    _write_json(out / "tokenizer_config.json", dict(specials, add_prefix_space=False, errors="replace", model_max_length=512, tokenizer_class="RobertaTokenizer"))
    _write_json(out / "special_tokens_map.json", specials)
    config = RobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1}, architectures=["RobertaForSequenceClassification"],
    )
    _save(RobertaForSequenceClassification(config), out)


def _bert_base(out: Path) -> None:
    """bert-base-uncased's config and tokenizer (Detoxify builds the model from its own checkpoint)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tiny_models import corpus
    from transformers import BertConfig

    specials = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials, show_progress=False))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tok.save(str(out / "tokenizer.json"))
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", dict(do_lower_case=True, model_max_length=512))
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=512, architectures=["BertForMaskedLM"]).to_json_file(out / "config.json")


def _detoxify_checkpoint(bert_config: Path) -> dict:
    """What Detoxify's "original" checkpoint holds: its training config (the base model's hub id, the
    class names) and a BertForSequenceClassification state dict over the mirrored bert-base-uncased."""
    from transformers import BertConfig, BertForSequenceClassification

    from farm.label.scorers import DETOXIFY_CLASSES

    config = BertConfig.from_json_file(bert_config)
    config.num_labels = len(DETOXIFY_CLASSES)
    return {
        "config": {
            "arch": {"type": "BERT", "args": {"model_type": BERT, "model_name": "BertForSequenceClassification",
                                              "tokenizer_name": "BertTokenizer", "num_classes": len(DETOXIFY_CLASSES)}},
            "dataset": {"args": {"classes": list(DETOXIFY_CLASSES)}},
        },
        "state_dict": BertForSequenceClassification(config).state_dict(),
    }
