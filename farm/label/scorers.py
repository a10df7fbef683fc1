"""Scorers: `build(name)` gives an object with `.name` and `.score(texts) -> np.ndarray`.

- `roberta_hate`: facebook/roberta-hate-speech-dynabench-r4-target, the classifier behind
  HF evaluate's "toxicity" measurement; score = P("hate"), batched through transformers.
- `embedded_toxicity`: works with no hub — a TF-IDF + logistic-regression classifier trained
  at first use on the bundled SafeNLP ToxiGen statements (hate vs neutral), cached under the
  farm's cache dir, with its held-out accuracy.
- `auto`: the hub classifier when it loads, else the embedded one (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from farm.data.sources import read_asset_lines
from farm.registry import scorers

ROBERTA_HATE = "facebook/roberta-hate-speech-dynabench-r4-target"
EMBEDDED_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("FARM_CACHE", Path.home() / ".cache" / "farm"))


def build(name: str, **kwargs):
    return scorers.get(name)(**kwargs)


class HubClassifier:
    """A sequence classifier scored batched; the score is the probability of one label."""

    def __init__(self, model: str, label: str, batch_size: int = 64, max_length: int = 256, local_files_only: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model, local_files_only=local_files_only)
        self.model = AutoModelForSequenceClassification.from_pretrained(model, local_files_only=local_files_only).eval()
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        if label not in labels:
            raise ValueError(f"{model} has no label {label!r}; its labels: {', '.join(labels)}")
        self.index, self.batch_size, self.max_length, self.torch = labels[label], batch_size, max_length, torch
        self.name = f"{Path(model).name}:P({label})"

    def score(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i : i + self.batch_size], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            with self.torch.no_grad():
                probs = self.torch.softmax(self.model(**enc).logits.float(), -1)
            out.append(probs[:, self.index].numpy())
        return np.concatenate(out) if out else np.zeros(0)


@scorers.register("roberta_hate")
def roberta_hate(model: str = ROBERTA_HATE, **kw) -> HubClassifier:
    return HubClassifier(model, "hate", **kw)


@dataclass
class EmbeddedToxicity:
    pipeline: object
    accuracy: float  # on the held-out fifth of the statements
    name: str = "embedded_toxicity:tfidf-logreg-toxigen"

    def score(self, texts: list[str]) -> np.ndarray:
        return self.pipeline.predict_proba(list(texts))[:, 1] if len(texts) else np.zeros(0)


def toxigen_statements() -> list[dict]:
    return json.loads("\n".join(read_asset_lines("safenlp/toxiGen.json.gz")))


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
    """Trained once, then loaded from `<cache>/scorers/` (written atomically)."""
    from farm.cache import atomic_write

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
    try:  # a cached or local copy loads without the hub; otherwise only try the hub if it answers
        return roberta_hate(local_files_only=not hub_reachable(), **kw)
    except (OSError, ValueError) as e:  # no hub and no local copy
        print(f"farm: warning: toxicity scorer {ROBERTA_HATE} unavailable ({type(e).__name__}); "
              "using embedded_toxicity (TF-IDF classifier trained on SafeNLP ToxiGen)", file=sys.stderr)
        return embedded_toxicity()
