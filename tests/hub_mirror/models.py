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
- `OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1` (Study D's judge, as ScalingAlignment's): model type
  `gpt_neox_reward_model`, which transformers does not know (OpenAssistant's `GPTNeoXRewardModel`:
  a GPT-NeoX body `gpt_neox.*` and `out_proj`, a Linear with a bias; "last" pooling), in
  `pytorch_model.bin`; a Pythia tokenizer (`GPTNeoXTokenizer`; `<|endoftext|>`=0 as BOS, EOS, UNK and
  SEP, `<|padding|>`=1) with OpenAssistant's chat tokens added (`<|prompter|>`, `<|assistant|>`, ...).
- `hf-internal-testing/llama-tokenizer` (Study D's prompt diversity, counted with LLaMA's tokenizer): the
  tokenizer files of tests/tiny_models.py's llama-base (BOS added), no weights.
- Detoxify "unbiased" (Study C's evaluation): `toxic_debiased-c7548aa0.ckpt` beside it, a
  RobertaForSequenceClassification over `roberta-base` (config and `RobertaTokenizer` files mirrored) with
  Jigsaw Unintended Bias's 16 classes.
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
OASST_PYTHIA_RM = "OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1"
LLAMA_TOKENIZER = "hf-internal-testing/llama-tokenizer"
OASST_TOKENS = ["<|assistant|>", "<|prefix_begin|>", "<|prefix_end|>", "<|prompter|>", "<|system|>"]
ROBERTA_HATE = "facebook/roberta-hate-speech-dynabench-r4-target"
BERT = "bert-base-uncased"
DETOXIFY_CKPT = "toxic_original-c1212f89.ckpt"  # the file name in detoxify.detoxify.MODEL_URLS["original"]
DETOXIFY_UNBIASED_CKPT = "toxic_debiased-c7548aa0.ckpt"  # MODEL_URLS["unbiased"]
ROBERTA = "roberta-base"
DETOXIFY_UNBIASED_CLASSES = (
    "toxicity",
    "severe_toxicity",
    "obscene",
    "identity_attack",
    "insult",
    "threat",
    "sexual_explicit",
    "male",
    "female",
    "homosexual_gay_or_lesbian",
    "christian",
    "jewish",
    "muslim",
    "black",
    "white",
    "psychiatric_or_mental_illness",
)
FROM_TINY = {
    "gpt2": "gpt2",
    "meta-llama/Llama-2-7b-hf": "llama-base",
    "meta-llama/Llama-2-7b-chat-hf": "llama",
    "facebook/opt-1.3b": "opt",
}
MODELS = (*FROM_TINY, DEBERTA_RM, OASST_PYTHIA_RM, LLAMA_TOKENIZER, ROBERTA_HATE, BERT, ROBERTA)


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
    llama = tiny_model_dir("llama-base")
    put(cache, "model", LLAMA_TOKENIZER, {p.name: p for p in llama.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))})
    with tempfile.TemporaryDirectory() as tmp:
        for repo, builder in (
            (DEBERTA_RM, _deberta_rm),
            (OASST_PYTHIA_RM, _oasst_pythia_rm),
            (ROBERTA_HATE, _roberta_hate),
            (BERT, _bert_base),
            (ROBERTA, _roberta_base),
        ):
            out = Path(tmp) / repo.replace("/", "--")
            out.mkdir()
            torch.manual_seed(0)
            builder(out)
            put(cache, "model", repo, {p.name: p for p in out.iterdir() if p.is_file()})
        checkpoints = torch_home(cache) / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        from farm.label.scorers import DETOXIFY_CLASSES

        torch.save(_detoxify_checkpoint(BERT, Path(tmp) / BERT / "config.json", DETOXIFY_CLASSES), checkpoints / DETOXIFY_CKPT)
        torch.manual_seed(0)
        torch.save(
            _detoxify_checkpoint(ROBERTA, Path(tmp) / ROBERTA / "config.json", DETOXIFY_UNBIASED_CLASSES), checkpoints / DETOXIFY_UNBIASED_CKPT
        )
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
    from tiny_models import HUGE, corpus
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(vocab_size=1000, special_tokens=specials, unk_token="[UNK]", show_progress=False))
    tok.add_special_tokens(["[MASK]"])  # last, as 128000 in the real vocabulary
    tok.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        dict(
            bos_token="[CLS]",
            cls_token="[CLS]",
            do_lower_case=False,
            eos_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=HUGE,
            pad_token="[PAD]",
            sep_token="[SEP]",
            split_by_punct=False,
            tokenizer_class="DebertaV2Tokenizer",
            unk_token="[UNK]",
            vocab_type="spm",
        ),
    )
    _write_json(
        out / "special_tokens_map.json",
        dict(bos_token="[CLS]", cls_token="[CLS]", eos_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]", sep_token="[SEP]", unk_token="[UNK]"),
    )
    n = tok.get_vocab_size()
    config = DebertaV2Config(
        vocab_size=n + 99,  # the real embedding is larger than the vocabulary too (128100 vs 128001)
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        position_biased_input=False,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        pad_token_id=0,
        num_labels=1,
        architectures=["DebertaV2ForSequenceClassification"],
    )
    _save(DebertaV2ForSequenceClassification(config), out)


def _oasst_pythia_rm(out: Path) -> None:
    import torch
    from tiny_models import HUGE, _byte_level_bpe
    from tokenizers import AddedToken
    from transformers import GPTNeoXConfig, GPTNeoXModel

    eos, pad = "<|endoftext|>", "<|padding|>"
    tok = _byte_level_bpe([eos, pad], 1000)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in OASST_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    specials = dict(bos_token=eos, eos_token=eos, pad_token=pad, sep_token=eos, unk_token=eos, additional_special_tokens=OASST_TOKENS)
    _write_json(out / "special_tokens_map.json", specials)
    _write_json(out / "tokenizer_config.json", dict(specials, add_prefix_space=False, model_max_length=HUGE, tokenizer_class="GPTNeoXTokenizer"))
    body = dict(
        vocab_size=tok.get_vocab_size() + 6,  # the real embedding is larger than the vocabulary too (50288)
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    neox = GPTNeoXModel(GPTNeoXConfig(**body))
    head = torch.nn.Linear(32, 1)
    torch.nn.init.normal_(head.bias, std=1.0)  # a bias that matters: transformers' own `score` has none
    state = {**{f"gpt_neox.{k}": v for k, v in neox.state_dict().items()}, **{f"out_proj.{k}": v for k, v in head.state_dict().items()}}
    torch.save(state, out / "pytorch_model.bin")
    _write_json(
        out / "config.json",
        dict(body, architectures=["GPTNeoXRewardModel"], model_type="gpt_neox_reward_model", pooling="last", torch_dtype="float32"),
    )


def _roberta_files(out: Path, **config):
    """A RoBERTa repository's tokenizer files (vocab.json + merges.txt, no tokenizer.json) and its config."""
    from tiny_models import _byte_level_bpe, _write_vocab_merges
    from tokenizers import AddedToken
    from transformers import RobertaConfig

    tok = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"], 1000)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    _write_vocab_merges(tok, out)
    specials = dict(bos_token="<s>", cls_token="<s>", eos_token="</s>", mask_token="<mask>", pad_token="<pad>", sep_token="</s>", unk_token="<unk>")
    _write_json(
        out / "tokenizer_config.json",
        dict(specials, add_prefix_space=False, errors="replace", model_max_length=512, tokenizer_class="RobertaTokenizer"),
    )
    _write_json(out / "special_tokens_map.json", specials)
    return RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **config,
    )


def _roberta_hate(out: Path) -> None:
    from transformers import RobertaForSequenceClassification

    config = _roberta_files(
        out, id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1}, architectures=["RobertaForSequenceClassification"]
    )
    _save(RobertaForSequenceClassification(config), out)


def _roberta_base(out: Path) -> None:
    """roberta-base's config and tokenizer (Detoxify "unbiased" builds the model from its own checkpoint)."""
    _roberta_files(out, architectures=["RobertaForMaskedLM"]).to_json_file(out / "config.json")


def _bert_base(out: Path) -> None:
    """bert-base-uncased's config and tokenizer (Detoxify builds the model from its own checkpoint)."""
    from tiny_models import corpus
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig

    specials = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials, show_progress=False))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 101), ("[SEP]", 102)]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", dict(do_lower_case=True, model_max_length=512))
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        architectures=["BertForMaskedLM"],
    ).to_json_file(out / "config.json")


def _detoxify_checkpoint(base: str, config_file: Path, classes: tuple[str, ...]) -> dict:
    """What a Detoxify checkpoint holds: its training config (the base model's hub id, its classifier and
    tokenizer classes, the class names) and the classifier's state dict over the mirrored base. "original":
    BERT over bert-base-uncased, Jigsaw's 6 classes; "unbiased": RoBERTa over roberta-base, Jigsaw Unintended
    Bias's 16 columns (7 toxicity subtypes, 9 identities)."""
    import transformers

    arch = {BERT: "Bert", ROBERTA: "Roberta"}[base]
    config = getattr(transformers, f"{arch}Config").from_json_file(config_file)
    config.num_labels = len(classes)
    return {
        "config": {
            "arch": {
                "type": arch,
                "args": {
                    "model_type": base,
                    "model_name": f"{arch}ForSequenceClassification",
                    "tokenizer_name": f"{arch}Tokenizer",
                    "num_classes": len(classes),
                },
            },
            "dataset": {"args": {"classes": list(classes)}},
        },
        "state_dict": getattr(transformers, f"{arch}ForSequenceClassification")(config).state_dict(),
    }
