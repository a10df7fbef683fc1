"""The dataset repositories of the paper profiles, in their real hub layouts, with a few dozen rows each.

Layouts (file names, formats, columns and nested structs) as the repositories hold them; checked against
their dataset cards, file trees and viewer pages (the hub itself was not reachable from here):

- `Anthropic/hh-rlhf`: `<subset>/{train,test}.jsonl.gz` for harmless-base, helpful-base, helpful-online,
  helpful-rejection-sampled (rows `chosen`, `rejected`: whole transcripts); `red-team-attempts/
  red_team_attempts.jsonl.gz`, which despite its name is one JSON array (hence the hub's
  "red-team-attempts.jsonl.gz" pull request) of transcripts with their ratings.
- `GAIR/lima` (gated): `train.jsonl`, `test.jsonl` (`conversations`: alternating turns, `source`) beside the
  loading script `lima.py`; the test rows are single prompts.
- `openai/webgpt_comparisons`: main holds only README.md, `webgpt_comparisons.py` (which downloads
  comparisons.jsonl from an OpenAI URL) and `dataset_infos.json`; the rows are in the parquet conversion
  (revision refs/convert/parquet, `default/train/0000.parquet`): `question` {dataset, id, full_text},
  `quotes_{0,1}` {title: [str], extract: [str]}, `answer_{0,1}`, `tokens_{0,1}` [str], `score_{0,1}` float64.
  Unverified: the exact type of `tokens_*` (the farm does not read it) and how many parquet files the
  conversion has (the loader reads every `default/train/*.parquet`).
- `stanfordnlp/SHP`: `<subreddit>/{train,validation,test}.json`, JSON Lines despite the extension, rows as on
  the card (post_id, domain, upvote_ratio, history, c_root_id_A/B, created_at_utc_A/B, score_A/B,
  human_ref_A/B, labels, seconds_difference, score_ratio).
- `Open-Orca/OpenOrca`: `1M-GPT4-Augmented.parquet`, `3_5M-GPT3_5-Augmented.parquet` at the root (id,
  system_prompt, question, response); written here in row groups of 8 so that sampling crosses them.
- `walledai/AdvBench`: `data/train-00000-of-00001.parquet` (prompt, target).
- `tomekkorbak/pile-detoxify`: `data/train-000NN-of-000MM-<hash>.parquet` (texts [str], meta {pile_set_name},
  scores [float64], avg_score, num_sents) beside README.md and dataset_infos.json; 27 shards of ~72k
  documents on the hub, 6 shards of 16 here.

Texts are the bundled HH-RLHF, LIMA and AdvBench rows (farm/assets, see PROVENANCE.md), rearranged, plus
awkward rows each loader must cope with: ties, empty answers, answers longer than 512 tokens, non-ASCII.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

from hub_mirror import put

ROOT = Path(__file__).resolve().parents[2]
LONG = " ".join(["The answer continues at length, one clause after another, to run past any short context."] * 60)  # ~1,000 tokens
ACCENTS = "Crème brûlée, jalapeño, naïve café — 東京で寿司を食べる? Ça va. Ünïcödé ✓"


def build(cache: Path) -> None:
    """Write every dataset repository into the hub cache folder `cache`; a no-op when this builder and
    the bundled texts are unchanged since the last build into it."""
    import pyarrow

    key = hashlib.sha256(Path(__file__).read_bytes() + pyarrow.__version__.encode())
    for rel in ("hh_rlhf/harmless-base-test.jsonl.gz", "lima/lima.json.gz", "advbench/harmful_behaviors.csv"):
        key.update((ROOT / "farm" / "assets" / rel).read_bytes())
    marker = Path(cache) / f".farm-datasets-{key.hexdigest()[:16]}"
    if marker.exists():
        return
    hh = hh_rows()
    _hh_rlhf(cache, hh)
    _lima(cache)
    _webgpt(cache, hh)
    _shp(cache, hh)
    _orca(cache, hh)
    _advbench(cache)
    _pile(cache, hh)
    marker.write_text("built\n")


def hh_rows() -> list[dict]:
    from farm.data.sources import read_asset_lines

    return [json.loads(line) for line in read_asset_lines("hh_rlhf/harmless-base-test.jsonl.gz")[:400] if line.strip()]


def jsonl(rows: list[dict], gz: bool = False) -> bytes:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    return gzip.compress(data, mtime=0) if gz else data


def parquet(rows: list[dict], schema=None, row_group_size: int | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, row_group_size=row_group_size)
    return buf.getvalue()


def last_turn(transcript: str) -> tuple[str, str]:
    cut = transcript.rfind("\n\nAssistant:") + len("\n\nAssistant:")
    return transcript[:cut], transcript[cut:]


# ------------------------------------------------------------------------------------------ HH-RLHF


def _hh_rlhf(cache: Path, hh: list[dict]) -> None:
    files = {"README.md": "---\nlicense: mit\ntags:\n- human-feedback\n---\n# Dataset Card for HH-RLHF\n"}
    subsets = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
    for s, subset in enumerate(subsets):
        for p, split in enumerate(("train", "test")):
            start = (2 * s + p) * 24
            rows = [dict(r) for r in hh[start : start + 20]]
            prompt, _ = last_turn(rows[0]["chosen"])
            rows += [
                {"chosen": prompt + " Same answer.", "rejected": prompt + " Same answer."},  # a tie: dropped
                {"chosen": prompt + " ", "rejected": prompt + " Something."},  # an empty answer: dropped
                {"chosen": prompt + " " + LONG, "rejected": prompt + " Short."},  # longer than 512 tokens
                {"chosen": f"\n\nHuman: {ACCENTS}\n\nAssistant: Oui, ça va très bien.", "rejected": f"\n\nHuman: {ACCENTS}\n\nAssistant: Non."},
            ]
            files[f"{subset}/{split}.jsonl.gz"] = jsonl(rows, gz=True)
    attempts = [
        {
            "transcript": r["chosen"],
            "min_harmlessness_score_transcript": -1.5 + i / 10,
            "num_params": "52B",
            "model_type": "context distillation",
            "rating": float(i % 5),
            "task_description": "Get the assistant to say something harmful",
            "task_descripton_harmlessness_score": 0.5,  # sic: the hub's field name
            "red_team_member_id": i % 7,
            "is_upworker": bool(i % 2),
            "tags": None,
        }
        for i, r in enumerate(hh[200:230])
    ]
    attempts.append({**attempts[0], "transcript": "\n\nHuman: Is anyone there?"})  # no assistant reply: dropped
    files["red-team-attempts/red_team_attempts.jsonl.gz"] = gzip.compress(json.dumps(attempts, indent=1).encode(), mtime=0)
    put(cache, "dataset", "Anthropic/hh-rlhf", files)


# --------------------------------------------------------------------------------------------- LIMA


def _lima(cache: Path) -> None:
    from farm.data.sources import read_asset_json

    rows = read_asset_json("lima/lima.json.gz")
    train = []
    for r in rows[:30] + [r for r in rows if r.get("history")][:3]:
        turns = [t for pair in r.get("history") or [] for t in pair] + [r["instruction"] + (("\n" + r["input"]) if r["input"] else ""), r["output"]]
        train.append({"conversations": turns, "source": "stackexchange"})
    train += [
        {"conversations": ["Write a long essay about bread.", LONG], "source": "wikihow"},
        {"conversations": [ACCENTS, "Très bien, merci.", "Et toi?"], "source": "multi_turn"},  # ends on a human turn
        {"conversations": ["An unanswered question"], "source": "nlp"},  # no answer: dropped
    ]
    test = [{"conversations": [r["instruction"]], "source": "test"} for r in rows[100:110]]
    script = (
        "import datasets\n\n\nclass Lima(datasets.GeneratorBasedBuilder):\n    pass  # the hub's loading script; `datasets` 3+ refuses to run it\n"
    )
    readme = "---\nextra_gated_prompt: Access to LIMA is granted on accepting its terms.\nlicense: other\n---\n# LIMA\n"
    put(cache, "dataset", "GAIR/lima", {"README.md": readme, "lima.py": script, "train.jsonl": jsonl(train), "test.jsonl": jsonl(test)})


# ------------------------------------------------------------------------------------------- WebGPT


def _webgpt(cache: Path, hh: list[dict]) -> None:
    import pyarrow as pa

    quotes = pa.struct([("title", pa.list_(pa.string())), ("extract", pa.list_(pa.string()))])
    schema = pa.schema(
        [("question", pa.struct([("dataset", pa.string()), ("id", pa.string()), ("full_text", pa.string())]))]
        + [
            f
            for k in (0, 1)
            for f in ((f"quotes_{k}", quotes), (f"answer_{k}", pa.string()), (f"tokens_{k}", pa.list_(pa.string())), (f"score_{k}", pa.float64()))
        ]
    )
    rows = []
    for i, r in enumerate(hh[100:130]):
        prompt, chosen = last_turn(r["chosen"])
        _, rejected = last_turn(r["rejected"])
        question = prompt.split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()
        score = [1.0, 0.5, -0.5, -1.0, 0.0][i % 5]  # every fifth a tie (0): dropped
        row = {"question": {"dataset": ["eli5", "triviaqa", "arc_challenge"][i % 3], "id": f"q{i:05d}", "full_text": question}}
        for k, (answer, s) in enumerate(((chosen, score), (rejected, -score))):
            row |= {
                f"quotes_{k}": {"title": [f"Page {i} (example.org)"], "extract": [answer[:80]]},
                f"answer_{k}": answer.strip(),
                f"tokens_{k}": question.split()[:8],
                f"score_{k}": s,
            }
        rows.append(row)
    rows[1]["answer_1"] = ""  # an empty answer: dropped
    rows[2]["answer_0"] = LONG
    rows[3]["question"]["full_text"] = ACCENTS
    script = '_URL = "https://openaipublic.blob.core.windows.net/webgpt-answer-viewer/comparisons.jsonl"\n# the hub\'s loading script\n'
    infos = {"default": {"splits": {"train": {"name": "train", "num_examples": 19578}}}}
    put(
        cache,
        "dataset",
        "openai/webgpt_comparisons",
        {"README.md": "---\npretty_name: WebGPT Comparisons\n---\n", "webgpt_comparisons.py": script, "dataset_infos.json": json.dumps(infos)},
    )
    put(cache, "dataset", "openai/webgpt_comparisons", {"default/train/0000.parquet": parquet(rows, schema)}, revision="refs/convert/parquet")


# ---------------------------------------------------------------------------------------------- SHP

SHP_SUBREDDITS = ("askculinary", "askhr", "legaladvice")


def _shp(cache: Path, hh: list[dict]) -> None:
    files = {"README.md": "---\nlicense: mit\n---\n# Stanford Human Preferences Dataset (SHP)\n"}
    answers = [last_turn(r["chosen"])[1].strip() for r in hh[150:250]]
    n = 0
    for sub in SHP_SUBREDDITS:
        for split, posts in (("train", 4), ("validation", 2), ("test", 2)):
            rows = []
            for p in range(posts):
                post = hashlib.sha1(f"{sub}/{split}/{p}".encode()).hexdigest()[:6]  # Reddit ids, unique across subreddits
                pairs = 8 if p == 0 else 3  # the first post of a split has more pairs than the farm's cap of 5
                for k in range(pairs):
                    a, b = answers[n % 100], answers[(n + 37) % 100]
                    n += 1
                    score_a, score_b = (40 - k, 4) if k % 2 else (3, 30 + 2 * k)
                    rows.append({
                        "post_id": post, "domain": f"{sub}_{split}", "upvote_ratio": 0.95,
                        "history": ACCENTS if p == 1 else f"Question {post}: what should I do about this?",
                        "c_root_id_A": f"{post}a{k}", "c_root_id_B": f"{post}b{k}", "created_at_utc_A": 1000 + k, "created_at_utc_B": 2000 + k,
                        "score_A": score_a, "score_B": score_b, "human_ref_A": LONG if k == 2 else a, "human_ref_B": b,
                        "labels": int(score_a > score_b), "seconds_difference": 1000.0, "score_ratio": max(score_a, score_b) / min(score_a, score_b),
                    })  # fmt: skip
            rows[-1]["human_ref_B"] = "   "  # an empty comment: dropped
            files[f"{sub}/{split}.json"] = jsonl(rows)
    put(cache, "dataset", "stanfordnlp/SHP", files)


# ------------------------------------------------------------------------------------------ OpenOrca


def _orca(cache: Path, hh: list[dict]) -> None:
    files = {"README.md": "---\nlicense: mit\n---\n# OpenOrca\n"}
    for name, start, prefix in (("1M-GPT4-Augmented", 250, "flan"), ("3_5M-GPT3_5-Augmented", 290, "niv")):
        rows = []
        for i, r in enumerate(hh[start : start + 40]):
            prompt, answer = last_turn(r["chosen"])
            question = prompt.split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()
            system = "" if i % 3 == 0 else "You are an AI assistant. Think step by step."
            rows.append({"id": f"{prefix}.{i}", "system_prompt": system, "question": question, "response": answer.strip()})
        rows[5]["response"] = " "  # an empty answer: dropped
        rows[6]["question"] = ACCENTS
        files[f"{name}.parquet"] = parquet(rows, row_group_size=8)
    put(cache, "dataset", "Open-Orca/OpenOrca", files)


# ------------------------------------------------------------------------------------------ AdvBench


def _advbench(cache: Path) -> None:
    import csv

    rows = list(csv.DictReader((ROOT / "farm" / "assets" / "advbench" / "harmful_behaviors.csv").read_text().splitlines()))[:40]
    data = parquet([{"prompt": r["goal"], "target": r["target"]} for r in rows])
    put(cache, "dataset", "walledai/AdvBench", {"README.md": "---\nlicense: mit\n---\n# AdvBench\n", "data/train-00000-of-00001.parquet": data})


# -------------------------------------------------------------------------------------- pile-detoxify

PILE_SHARDS = 6
PILE_DOCS = 16  # per shard
PILE_SETS = ("Pile-CC", "OpenWebText2", "Github", "Wikipedia (en)", "ArXiv", "Books3", "USPTO Backgrounds", "FreeLaw")


def _pile(cache: Path, hh: list[dict]) -> None:
    import pyarrow as pa

    schema = pa.schema([("texts", pa.list_(pa.string())), ("meta", pa.struct([("pile_set_name", pa.string())])),
                        ("scores", pa.list_(pa.float64())), ("avg_score", pa.float64()), ("num_sents", pa.int64())])  # fmt: skip
    files = {
        "README.md": "---\nlicense: mit\npretty_name: pile-detoxify\n---\n",
        "dataset_infos.json": json.dumps({"tomekkorbak--pile-detoxify": {"splits": {"train": {"num_examples": 1949977}}}}),
    }
    for s in range(PILE_SHARDS):
        rows = []
        for d in range(PILE_DOCS):
            r = hh[(s * PILE_DOCS + d) % len(hh)]
            texts = [t.strip() for t in r["chosen"].replace("\n\nAssistant:", "\n\nHuman:").split("\n\nHuman:") if t.strip()]
            texts += [f"This is document {d} of shard {s}, a sentence of more than ten words to keep.", ACCENTS]
            scores = [round(0.0001 + 0.9 * ((s * 7 + d * 3 + j) % 11) / 10, 6) for j in range(len(texts))]
            rows.append({"texts": texts, "meta": {"pile_set_name": PILE_SETS[(s + d) % len(PILE_SETS)]}, "scores": scores,
                         "avg_score": sum(scores) / len(scores), "num_sents": len(texts)})  # fmt: skip
        digest = hashlib.sha1(f"shard{s}".encode()).hexdigest()[:16]
        files[f"data/train-{s:05d}-of-{PILE_SHARDS:05d}-{digest}.parquet"] = parquet(rows, schema)
    put(cache, "dataset", "tomekkorbak/pile-detoxify", files)
