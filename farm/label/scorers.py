"""Scorers: `build(name, **kwargs)` gives an object with `.name`, `.columns`,
`.fields(texts) -> {column: np.ndarray}` (every score it gives) and, for the toxicity
scorers, `.score(texts) -> np.ndarray` (the main score, the `toxicity` column).

- `detoxify`: Detoxify's classifier heads (toxicity, severe_toxicity, obscene, threat, insult,
  identity_attack, ...); `model` is a released model (original | unbiased | multilingual, which
  download checkpoints and their hub base model: a cluster with internet or a warm cache) or a
  local checkpoint file (works offline; `write_tiny_detoxify` writes a random tiny one).
- `vader`: VADER polarity scores neg, neu, pos, compound (lexicon ships with the package).
- `roberta_hate`: facebook/roberta-hate-speech-dynabench-r4-target, the classifier behind
  HF evaluate's "toxicity" measurement; score = P("hate"), batched through transformers.
- `embedded_toxicity`: works with no hub — a TF-IDF + logistic-regression classifier trained
  at first use on the bundled SafeNLP ToxiGen statements (hate vs neutral), cached under the
  farm's cache dir, with its held-out accuracy.
- `auto`: the hub classifier when it loads, else the embedded one (with a warning).
- The last three give one column, `toxicity`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from farm.data.sources import asset_path, read_asset_json
from farm.files import atomic_write
from farm.registry import scorers

ROBERTA_HATE = "facebook/roberta-hate-speech-dynabench-r4-target"
EMBEDDED_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("FARM_CACHE", Path.home() / ".cache" / "farm"))


def build(name: str, **kwargs):
    return scorers.get(name)(**kwargs)


def check(name: str, model: str | None = None) -> None:
    """Raise ValueError (or registry.UnknownName) for a scorer that cannot be built, without
    building it: cheap enough to run before Ray starts."""
    scorers.get(name)
    if name == "detoxify":
        detoxify_source(model)
    elif name == "vader" and model:
        raise ValueError("vader takes no model")


def torch_device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class HubClassifier:
    """A sequence classifier scored batched; the score is the probability of one label."""

    columns: ClassVar[tuple[str, ...]] = ("toxicity",)

    def __init__(
        self, model: str, label: str, batch_size: int = 64, max_length: int = 256, local_files_only: bool = False, device: str | None = None
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch_device(device)
        self.tok = AutoTokenizer.from_pretrained(model, local_files_only=local_files_only)
        self.model = AutoModelForSequenceClassification.from_pretrained(model, local_files_only=local_files_only).eval().to(self.device)
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        if label not in labels:
            raise ValueError(f"{model} has no label {label!r}; its labels: {', '.join(labels)}")
        self.index, self.batch_size, self.max_length, self.torch = labels[label], batch_size, max_length, torch
        self.name = f"{Path(model).name}:P({label})"

    def score(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(list(texts[i : i + self.batch_size]), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            with self.torch.no_grad():
                probs = self.torch.softmax(self.model(**enc.to(self.device)).logits.float(), -1)
            out.append(probs[:, self.index].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def fields(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"toxicity": self.score(texts)}


@scorers.register("roberta_hate")
def roberta_hate(model: str = ROBERTA_HATE, **kw) -> HubClassifier:
    """A hate-speech classifier from the hub (by default Facebook's RoBERTa, Dynabench R4): P(hate) per text."""
    return HubClassifier(model, "hate", **kw)


@dataclass
class EmbeddedToxicity:
    pipeline: object
    accuracy: float  # on the held-out fifth of the statements
    name: str = "embedded_toxicity:tfidf-logreg-toxigen"
    columns: ClassVar[tuple[str, ...]] = ("toxicity",)

    def score(self, texts: list[str]) -> np.ndarray:
        return self.pipeline.predict_proba(list(texts))[:, 1] if len(texts) else np.zeros(0)

    def fields(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"toxicity": self.score(texts)}


def toxigen_statements() -> list[dict]:
    return read_asset_json("safenlp/toxiGen.json.gz")


def train_embedded_toxicity() -> EmbeddedToxicity:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    rows = toxigen_statements()
    held = [hashlib.sha256(str(r["id"]).encode()).digest()[0] < 52 for r in rows]  # ~20%, fixed
    x = [r["text"] for r in rows]
    y = np.array([r["label"] == "hate" for r in rows], dtype=int)
    train = [i for i, h in enumerate(held) if not h]
    test = [i for i, h in enumerate(held) if h]
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True), LogisticRegression(max_iter=2000, C=4.0))
    pipe.fit([x[i] for i in train], y[train])
    accuracy = float((pipe.predict([x[i] for i in test]) == y[test]).mean())
    return EmbeddedToxicity(pipe, accuracy)


@scorers.register("embedded_toxicity")
def embedded_toxicity(**_) -> EmbeddedToxicity:
    """A TF-IDF toxicity classifier trained on the bundled SafeNLP ToxiGen statements (no download).

    Trained once, then loaded from `<cache>/scorers/` (written atomically)."""
    path = cache_dir() / "scorers" / f"embedded_toxicity-v{EMBEDDED_VERSION}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    scorer = train_embedded_toxicity()
    atomic_write(path, pickle.dumps(scorer))
    return scorer


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all: an unreachable hub costs ~50 s of retries per model load."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


@scorers.register("auto")
def auto(**kw):
    """roberta_hate where its model is cached or the hub answers, else embedded_toxicity (with a warning)."""
    try:  # a cached or local copy loads without the hub; otherwise only try the hub if it answers
        return roberta_hate(local_files_only=not hub_reachable(), **kw)
    except (OSError, ValueError) as e:  # no hub and no local copy
        print(
            f"farm: warning: toxicity scorer {ROBERTA_HATE} unavailable ({type(e).__name__}); "
            "using embedded_toxicity (TF-IDF classifier trained on SafeNLP ToxiGen)",
            file=sys.stderr,
        )
        return embedded_toxicity()


# ---------------------------------------------------------------- Detoxify

# Jigsaw's class names, as Detoxify renames them (its "original" model's heads).
DETOXIFY_CLASSES = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
DETOXIFY_COLUMNS = ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
# detoxify.detoxify.MODEL_URLS's names, kept here so that checking a study file imports no torch.
DETOXIFY_RELEASED = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")


def detoxify_source(model: str | None) -> dict:
    """Detoxify's constructor arguments for `model`: a released model name or a checkpoint file."""
    model = model or "original"
    if model in DETOXIFY_RELEASED:
        return {"model_type": model}
    path = Path(model).expanduser()
    if path.is_file():
        return {"checkpoint": str(path.resolve())}
    raise ValueError(f"detoxify model {model!r} is neither a released model ({', '.join(DETOXIFY_RELEASED)}) nor an existing checkpoint file")


class DetoxifyScorer:
    """Detoxify's `predict` over chunks of `batch_size` texts, sorted by length within a call so
    that a chunk pads little; scores come back in the input order."""

    def __init__(self, model: str | None = None, batch_size: int = 64, device: str | None = None):
        from detoxify import Detoxify
        from transformers.utils import logging as hf_logging

        source = detoxify_source(model)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Loading weights" bars, once per actor
        try:
            self.detox = Detoxify(**source, device=torch_device(device))
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.columns = tuple(self.detox.class_names)
        self.batch_size = batch_size
        self.name = f"detoxify:{model or 'original'}"

    def fields(self, texts: list[str]) -> dict[str, np.ndarray]:
        texts = list(texts)
        out = {c: np.zeros(len(texts), dtype=np.float64) for c in self.columns}
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for k in range(0, len(order), self.batch_size):
            chunk = order[k : k + self.batch_size]
            pred = self.detox.predict([texts[i] for i in chunk])  # one text gives floats, more give lists
            for c in self.columns:
                out[c][chunk] = np.atleast_1d(np.asarray(pred[c], dtype=np.float64))
        return out

    def score(self, texts: list[str]) -> np.ndarray:
        return self.fields(texts)["toxicity"]


@scorers.register("detoxify")
def detoxify(model: str | None = None, **kw) -> DetoxifyScorer:
    """Detoxify (a released model, `original` by default, or a checkpoint): toxicity and its sub-scores per text."""
    return DetoxifyScorer(model, **kw)


def write_tiny_detoxify(
    folder, hidden: int = 32, layers: int = 1, heads: int = 2, intermediate: int | None = None, max_length: int = 128, seed: int = 0
) -> Path:
    """Write a randomly initialised Detoxify checkpoint that loads offline; return its path.

    `folder/base/` holds a `BertForSequenceClassification` config and the farm's 4k BPE
    tokenizer (with a leading `<|endoftext|>` as the classifier's [CLS] token), both saved with
    `save_pretrained`; `folder/tiny-detoxify.ckpt` is the dict Detoxify's `checkpoint=` loads,
    naming that folder (an absolute path: move the two together and rewrite it). Same arguments,
    same weights."""
    import torch
    from tokenizers import processors
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = Path(folder).resolve()
    base = folder / "base"
    tok = AutoTokenizer.from_pretrained(str(asset_path("farm_bpe")))
    cls = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", cls)])
    tok.model_max_length = max_length
    tok.save_pretrained(str(base))
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_length,
        num_labels=len(DETOXIFY_CLASSES),
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,
    )
    config.save_pretrained(str(base))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    checkpoint = {
        "config": {
            "arch": {
                "args": {
                    "model_type": str(base),
                    "model_name": "BertForSequenceClassification",
                    "tokenizer_name": "AutoTokenizer",
                    "num_classes": len(DETOXIFY_CLASSES),
                }
            },
            "dataset": {"args": {"classes": list(DETOXIFY_CLASSES)}},
        },
        "state_dict": model.state_dict(),
    }
    path = folder / "tiny-detoxify.ckpt"
    torch.save(checkpoint, path)
    return path


# ---------------------------------------------------------------- VADER


class Vader:
    """VADER `polarity_scores` of each text; `score` is the compound score."""

    columns: ClassVar[tuple[str, ...]] = ("neg", "neu", "pos", "compound")
    name = "vader"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def fields(self, texts: list[str]) -> dict[str, np.ndarray]:
        scores = [self.analyzer.polarity_scores(t) for t in texts]
        return {c: np.array([s[c] for s in scores], dtype=np.float64) for c in self.columns}

    def score(self, texts: list[str]) -> np.ndarray:
        return self.fields(texts)["compound"]


@scorers.register("vader")
def vader(model: str | None = None, **_) -> Vader:
    """VADER's rule-based sentiment: neg, neu, pos and the compound score (in [-1, 1]) per text."""
    if model:
        raise ValueError("vader takes no model")
    return Vader()


# Columns each scorer gives, where known before it loads (a Detoxify checkpoint names its own).
KNOWN_COLUMNS = {"vader": Vader.columns, "detoxify": DETOXIFY_COLUMNS}


def known_columns(name: str) -> tuple[str, ...]:
    return KNOWN_COLUMNS.get(name, ("toxicity",))
