"""How closely Study C's sentence splitter agrees with the seed's.

The seed splits each output with spaCy's `en_core_web_sm` pipeline, whose parser sets the sentence
boundaries (finetuning_llms_with_conditioning, scripts/Experiment.py). That model is a download
from spaCy's releases, not a PyPI package, so the farm splits with spaCy's rule-based
`sentencizer` unless a study names an installed pipeline (`eval.conditional.splitter`). This
prints, for three sets of texts, the share of texts each splitter cuts exactly as the reference
does (the same sentences, stripped), the share cut into as many sentences, and the sentences in
all; it writes `bench/results/sentence_split.json`.

Splitters: the regex the farm split with before (`farm.data.sources.split_sentences`), the
sentencizer (`farm.eval.misalignment.splitter`), and pysbd when it is installed.
Reference: `--reference` (default en_core_web_sm) when spaCy can load it; else the sentencizer,
which is then compared with itself (said in the output).

Texts (seeded, from the bundled data):
- runs: 2-3 cleaned sentences of the `sentences` source joined by a space, as a prompt and a
  continuation of a model trained on such sentences read;
- turns: human and assistant turns of the bundled HH-RLHF transcripts of more than 15 words;
- turns_clean: the same turns cleaned as the Study C data is (`clean_sentence`: no commas,
  quotes or other punctuation than ?.'!), the text the models learn to write.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np
from _results import write_result

from farm.data.sources import ASSISTANT, HUMAN, SourceSpec, clean_sentence, load_source, read_asset_lines, split_sentences
from farm.eval.misalignment import splitter


def texts(n: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    sentences = [r.text for sub in ("toxigen", "implicit_hate", "hh_rlhf") for r in load_source(SourceSpec(name="sentences", subset=sub))]
    runs = [" ".join(sentences[i] for i in rng.integers(0, len(sentences), k)) for k in rng.integers(2, 4, n)]
    turns = [
        t.strip()
        for line in read_asset_lines("hh_rlhf/harmless-base-test.jsonl.gz")
        if line.strip()
        for t in re.split(f"{re.escape(HUMAN)}|{re.escape(ASSISTANT)}", json.loads(line)["chosen"])
        if len(t.split()) > 15
    ]
    turns = [turns[i] for i in rng.choice(len(turns), min(n, len(turns)), replace=False)]
    return {"runs": runs, "turns": turns, "turns_clean": [clean_sentence(t) for t in turns]}


def reference(name: str):
    """(split, name): the seed's spaCy pipeline, or the sentencizer where it cannot be loaded."""
    import spacy

    try:
        nlp = spacy.load(name)
    except OSError:
        print(f"reference {name} is not installed: measuring against spaCy's sentencizer instead")
        return splitter("sentencizer"), "sentencizer"
    return (lambda ts: [[s.text.strip() for s in doc.sents if s.text.strip()] for doc in nlp.pipe(ts)]), name


def candidates() -> dict:
    out = {"regex": lambda ts: [[s.strip() for s in split_sentences(t) if s.strip()] for t in ts], "sentencizer": splitter("sentencizer")}
    try:
        import pysbd
    except ImportError:
        print("pysbd is not installed: not measured")
    else:
        seg = pysbd.Segmenter(language="en", clean=False)
        out["pysbd"] = lambda ts: [[s.strip() for s in seg.segment(t) if s.strip()] for t in ts]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1000, help="texts per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default="en_core_web_sm", help="the spaCy pipeline the others are compared with")
    args = parser.parse_args()
    ref_split, ref_name = reference(args.reference)
    splits = candidates()
    result = {"reference": ref_name, "texts_per_set": args.texts, "sets": {}}
    for set_name, ts in texts(args.texts, args.seed).items():
        start = time.perf_counter()
        ref = ref_split(ts)
        row = {"texts": len(ts), "reference_sentences": sum(map(len, ref)), "reference_seconds": round(time.perf_counter() - start, 2)}
        print(f"{set_name}: {len(ts)} texts, {row['reference_sentences']} sentences by {ref_name} ({row['reference_seconds']} s)")
        for name, split in splits.items():
            start = time.perf_counter()
            out = split(ts)
            seconds = time.perf_counter() - start
            row[name] = {
                "identical": round(float(np.mean([a == b for a, b in zip(out, ref)])), 3),
                "same_count": round(float(np.mean([len(a) == len(b) for a, b in zip(out, ref)])), 3),
                "sentences": sum(map(len, out)),
                "seconds": round(seconds, 2),
            }
            r = row[name]
            print(f"  {name:12s} identical {r['identical']:.3f}  same count {r['same_count']:.3f}  sentences {r['sentences']}  ({r['seconds']} s)")
        result["sets"][set_name] = row
    write_result("sentence_split", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
