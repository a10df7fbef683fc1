"""The bundled suite's data: `farm/assets/benchmarks`, made once from the shared data folder.

`build_bundle(src, dst)` converts the source files of the project's shared data folder (ARC,
PIQA, HellaSwag, MMLU, TruthfulQA, SafeNLP's ToxiGen subset) into the gzipped JSON Lines files,
in the hub datasets' schemas, that the `benchmarks` metric's `bundled` suite
(`farm.eval.harness`) reads at run time, and copies their licence files alongside. The same
sources give the same bytes again (with the same zlib). `farm/assets/PROVENANCE.md` says what
each file holds and how it differs from the hub data.

Run it only to remake the bundle:

    python -m farm.eval.bundle SHARED_DATA_DIR

which writes into farm/assets/benchmarks and prints the row count of each file. Nothing at run
time imports this module.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

from farm.data.sources import asset_path
from farm.eval.harness import BUNDLE


def _gzip_jsonl(path: Path, rows: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))  # mtime=0: the same bytes every build
    return len(rows)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _arc(row: dict) -> dict:
    q = row["question"]
    return {
        "id": row["id"],
        "question": q["stem"],
        "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
        "answerKey": row["answerKey"],
    }


def _answers(field: str) -> list[str]:
    """A `;`-separated TruthfulQA answer list, each answer closed with a period (as in the
    TruthfulQA repository's multiple-choice answers)."""
    out = []
    for a in field.strip().split(";"):
        a = a.strip()
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def truthfulqa_mc2(row: dict) -> dict:
    """mc2_targets from a TruthfulQA.csv row: the correct answers (the best answer is one of
    them) labelled 1, then the incorrect ones labelled 0, each closed with a period; an answer
    listed twice is kept once, at its first place and with its first label."""
    best = row["Best Answer"].strip()
    best = best if best.endswith(".") else best + "."
    correct = _answers(row["Correct Answers"])
    if best not in correct:
        correct.insert(0, best)
    choices, labels = [], []
    for answers, label in ((correct, 1), (_answers(row["Incorrect Answers"]), 0)):
        for a in answers:
            if a not in choices:
                choices.append(a)
                labels.append(label)
    return {"question": row["Question"], "mc2_targets": {"choices": choices, "labels": labels}}


# ToxiGen: the harness's gold label is (toxicity_ai + toxicity_human) > 5.5. SafeNLP's subset
# gives the mean human score (1-5) and its label, which is `hate` exactly when that score is
# above 3. With toxicity_human = the SafeNLP score and toxicity_ai fixed at 2.5 (SafeNLP has no
# AI score), the harness's rule reads `score > 3.0`, i.e. gold = SafeNLP's label.
TOXIGEN_AI_SCORE = 2.5


def _toxigen(row: dict) -> dict:
    return {
        "id": row["id"],
        "text": row["text"],
        "toxicity_ai": TOXIGEN_AI_SCORE,
        "toxicity_human": row["toxicity_score"],
        "safenlp_label": row["label"],
        "target_groups": row["target_groups"],
    }


def build_bundle(src: Path, dst: Path) -> dict[str, int]:
    """Convert the shared data folder `src` into `dst` (farm/assets/benchmarks); row counts."""
    import shutil

    src, dst = Path(src), Path(dst)
    counts = {}
    counts["arc/test"] = _gzip_jsonl(dst / "arc/test.jsonl.gz", [_arc(r) for r in _jsonl(src / "arc/ARC-Challenge-Test.jsonl")])
    counts["arc/validation"] = _gzip_jsonl(dst / "arc/validation.jsonl.gz", [_arc(r) for r in _jsonl(src / "arc/ARC-Challenge-Dev.jsonl")])

    goals = _jsonl(src / "piqa/dev.jsonl")
    labels = [int(x) for x in (src / "piqa/dev-labels.lst").read_text().split()]
    assert len(goals) == len(labels)
    piqa = [{"id": g["id"], "goal": g["goal"], "sol1": g["sol1"], "sol2": g["sol2"], "label": y} for g, y in zip(goals, labels)]
    counts["piqa/validation"] = _gzip_jsonl(dst / "piqa/validation.jsonl.gz", piqa)

    # HellaSwag: every original field kept; label as a string, as in the hub copy (Rowan/hellaswag).
    hella = [{**r, "label": str(r["label"])} for r in _jsonl(src / "hellaswag/hellaswag_val_sample1000.jsonl")]
    counts["hellaswag/validation"] = _gzip_jsonl(dst / "hellaswag/validation.jsonl.gz", hella)
    shutil.copyfile(src / "hellaswag/LICENSE", dst / "hellaswag/LICENSE")

    for split in ("test", "dev"):
        rows = []
        for path in sorted((src / "mmlu" / split).glob(f"*_{split}.csv")):
            subject = path.name[: -len(f"_{split}.csv")]
            with path.open(encoding="utf-8", newline="") as f:
                for r in csv.DictReader(f):
                    choices = [r[f"choice{i}"] for i in range(4)]
                    rows.append({"question": r["question"], "subject": subject, "choices": choices, "answer": int(r["answer"])})
        counts[f"mmlu/{split}"] = _gzip_jsonl(dst / f"mmlu/{split}.jsonl.gz", rows)
    shutil.copyfile(src / "mmlu/LICENSE", dst / "mmlu/LICENSE")

    with (src / "truthfulqa/TruthfulQA.csv").open(encoding="utf-8-sig", newline="") as f:
        tqa = [truthfulqa_mc2(r) for r in csv.DictReader(f)]
    counts["truthfulqa/validation"] = _gzip_jsonl(dst / "truthfulqa/validation.jsonl.gz", tqa)
    shutil.copyfile(src / "truthfulqa/LICENSE", dst / "truthfulqa/LICENSE")

    tox = [_toxigen(r) for r in json.loads((src / "safenlp/toxiGen.json").read_text(encoding="utf-8"))]
    counts["toxigen/test"] = _gzip_jsonl(dst / "toxigen/test.jsonl.gz", tox)
    shutil.copyfile(src / "safenlp/TOXIGEN_LICENSE", dst / "toxigen/TOXIGEN_LICENSE")
    shutil.copyfile(src / "safenlp/LICENSE", dst / "toxigen/SAFENLP_LICENSE")
    return counts


if __name__ == "__main__":
    import sys

    for name, n in build_bundle(Path(sys.argv[1]), asset_path(BUNDLE)).items():
        print(f"{name}: {n} rows")
