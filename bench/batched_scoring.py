"""What batching saves when the farm scores texts for toxicity.

Scores the same 10,000 texts with each of two scorers twice in one process: through the farm's
batched scorer (`scorer.score(texts)`), and one call per text — the way HF evaluate's toxicity
measurement scores a list. Prints wall times, rows/s and the ratio per scorer, and writes
`bench/results/batched_scoring.json`.

Scorers: a randomly initialised Detoxify-format BERT (`write_tiny_detoxify`, the shape of the
label-throughput benchmark's model scorer; the cost of a forward pass is what matters, not its
predictions) and `embedded_toxicity` (the TF-IDF classifier the embedded profiles score with).
The texts are cleaned sentences of the bundled corpus (Study C's `sentences` source), standing
in for generated answers of similar length. torch uses its default threads (the machine's cores).

Baseline: one call per text. Ratio = per-text seconds / batched seconds (the throughput gain of
batching; above 1: batching is faster). The issue sets no target for it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

# Spinning OpenMP threads stall whenever other work takes one of the 2 cores (seen here: the
# per-text loop 23x slower under a load of 4); passive waiting, as in label_throughput.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from _results import write_result

from farm.data.sources import (
    SourceSpec,  # noqa: E402
    load_source,  # noqa: E402
)
from farm.label.scorers import build, write_tiny_detoxify  # noqa: E402

MODEL_SHAPE = dict(hidden=256, layers=3, heads=4)


def timed(scorer, texts: list[str]) -> dict:
    scorer.score(texts[:64])  # warm-up: first-call costs belong to neither run
    start = time.perf_counter()
    batched = scorer.score(texts)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    single = np.array([scorer.score([t])[0] for t in texts])
    t_single = time.perf_counter() - start
    return {
        "batched_seconds": round(t_batched, 3),
        "per_text_seconds": round(t_single, 3),
        "batched_rows_per_s": round(len(texts) / t_batched, 1),
        "per_text_rows_per_s": round(len(texts) / t_single, 1),
        "ratio": round(t_single / t_batched, 2),
        "max_abs_score_difference": float(np.abs(batched - single).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()

    import torch

    sentences = [r.text for sub in ("toxigen", "hh_rlhf") for r in load_source(SourceSpec(name="sentences", subset=sub))]
    texts = (sentences * (args.rows // len(sentences) + 1))[: args.rows]
    result = {
        "rows": len(texts),
        "words_per_text": round(float(np.mean([len(t.split()) for t in texts])), 1),
        "torch_threads": torch.get_num_threads(),
    }
    result["load_average_start"] = round(os.getloadavg()[0], 2)
    print(
        f"batched scoring: {len(texts)} texts ({result['words_per_text']} words avg), {result['torch_threads']} torch threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average {result['load_average_start']}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        scorers = {
            f"detoxify-format BERT {MODEL_SHAPE}": build("detoxify", model=str(write_tiny_detoxify(tmp, **MODEL_SHAPE)), device="cpu"),
            "embedded_toxicity (TF-IDF + logistic regression)": build("embedded_toxicity"),
        }
        for name, scorer in scorers.items():
            r = result[name] = timed(scorer, texts)
            print(f"\n== {name}")
            print(f"  farm batched scorer   {r['batched_seconds']:8.2f} s  {r['batched_rows_per_s']:9.0f} rows/s")
            print(f"  one call per text     {r['per_text_seconds']:8.2f} s  {r['per_text_rows_per_s']:9.0f} rows/s")
            print(f"ratio: {r['ratio']:.2f}x batched / per-text throughput (no target; max |score difference| {r['max_abs_score_difference']:.1e})")
    write_result("batched_scoring", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
