"""Dataset sources: each maps a published schema onto one record shape.

A source reads either the copy bundled in `farm/assets` (the embedded profile, offline)
or the Hugging Face hub (a cluster). Both paths produce identical record shapes.

The hub path fetches only the files a spec needs (`hub_files`: repository, revision and file
patterns, in the repository's real layout) through `farm.hub`, and reads them here with
pyarrow/json: no dataset loading scripts (`datasets` 3+ refuses them, and two of the sources have
one), no whole-repository downloads (the Pile shards a sample needs, not all 7 GB).
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, ClassVar, Literal

from pydantic import Field, model_validator

from farm import hub
from farm.config import Strict, not_utf8
from farm.data.records import SHAPES, Comparison, Demonstration, Text
from farm.registry import sources

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass(frozen=True)
class Source:
    shape: str
    hub: str
    subsets: tuple[str, ...]
    bundled: dict[tuple[str, str], str]  # (subset, split) -> asset path
    load: Callable  # (spec, rows) -> records
    # spec -> the repository files (patterns) holding its (subset, split), in the hub's layout
    hub_patterns: Callable = lambda spec: []
    hub_revision: str | None = None  # None: main; hub.PARQUET for the hub's parquet conversion
    hub_splits: tuple[str, ...] = ("train",)  # the splits the repository has (others are refused)
    sharded: bool = False  # many parquet shards: a sample downloads only the shards it draws from
    # (subset, split) -> rows on the hub (from the dataset cards), for `farm plan`'s cost estimate
    # of a hub source read whole (no sample or limit); rows before the loader drops any.
    hub_rows: dict[tuple[str, str], int] = field(default_factory=dict)


def asset_path(rel: str):
    return resources.files("farm.assets").joinpath(rel)


def read_asset_lines(rel: str) -> list[str]:
    """Lines of a bundled file (gunzipped if .gz). Split on newlines only: the bundled text holds
    characters (U+2028, U+0085) that str.splitlines would also break at, inside JSON strings."""
    with asset_path(rel).open("rb") as f:
        raw = gzip.decompress(f.read()) if rel.endswith(".gz") else f.read()
    return [line.rstrip("\r") for line in raw.decode("utf-8").split("\n")]


def read_asset_json(rel: str):
    """A bundled JSON document (gunzipped if .gz)."""
    return json.loads("\n".join(read_asset_lines(rel)))


def read_rows(source: Source, spec) -> list[dict]:
    """Rows of one (subset, split) from the bundled copy or the hub, in a fixed order."""
    if spec.origin == "bundled":
        rel = source.bundled[(spec.subset, spec.split)]
        if rel.endswith((".jsonl", ".jsonl.gz")):
            rows = [json.loads(line) for line in read_asset_lines(rel) if line.strip()]
        elif rel.endswith(".csv"):
            rows = list(csv.DictReader(read_asset_lines(rel)))
        else:
            rows = read_asset_json(rel)
        rows = rows[: spec.limit] if spec.limit else rows
        return sample_rows(rows, spec, lambda keep: [rows[i] for i in keep])
    return read_hub_rows(source, spec)


def hub_files(spec) -> tuple[str, str | None, list[str]]:
    """(repository id, revision, file patterns) of the dataset files a hub source spec reads: at the
    spec's pinned revision, else the source's (the default branch, or the parquet conversion)."""
    source = sources.get(spec.name)
    if not source.hub:
        raise ValueError(f"{spec.name} has no hub copy (it is bundled only): remove origin: hub")
    if spec.split not in source.hub_splits:
        raise ValueError(f"split {spec.split!r} of {spec.name} on the hub ({source.hub}): allowed: {', '.join(source.hub_splits)}")
    return source.hub, spec.revision or source.hub_revision, source.hub_patterns(spec)


def read_hub_rows(source: Source, spec) -> list[dict]:
    """Rows of the files `hub_files(spec)` names, downloaded (or read from the hub cache) alone."""
    repo, revision, patterns = hub_files(spec)
    if source.sharded:
        return read_shards(spec, repo, revision, patterns)
    root = hub.snapshot(repo, "dataset", revision, patterns)
    names = hub.matching(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()), patterns)
    if not names:  # a cache holding the repository but not these files
        raise hub.HubError(f"dataset {repo} has no file matching {patterns} (in {root}): is it the repository the study means?")
    paths = [root / n for n in names]
    if all(n.endswith(".parquet") for n in names):
        return read_parquet_rows(paths, spec)
    rows = [row for path in paths for row in read_json_rows(path)]
    rows = cap_per_post(rows, spec.per_post) if spec.per_post else rows
    rows = rows[: spec.limit] if spec.limit else rows
    return sample_rows(rows, spec, lambda keep: [rows[i] for i in keep])


def read_json_rows(path) -> list[dict]:
    """A JSON Lines file (gzipped if .gz), or one JSON array (HH-RLHF's red-team file is one)."""
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if str(path).endswith(".gz") else raw).decode("utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    # Split on newlines only: JSON strings may hold U+2028 and the like (see read_asset_lines).
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def sample_positions(n: int, spec) -> list[int]:
    """Positions of the rows a spec keeps out of `n`: the first `limit`, then `sample` of them
    drawn with `seed` (the draw `sample_rows` makes), in file order."""
    import numpy as np

    n = min(n, spec.limit) if spec.limit else n
    if not spec.sample or spec.sample >= n:
        return list(range(n))
    return sorted(np.random.default_rng(spec.seed).choice(n, spec.sample, replace=False).tolist())


def read_parquet_rows(paths, spec) -> list[dict]:
    """The rows a spec keeps of parquet files read as one table, tagged with their positions."""
    import pyarrow.parquet as pq

    keep = sample_positions(sum(pq.ParquetFile(p).metadata.num_rows for p in paths), spec)
    return take_rows(paths, keep, lambda file, row, overall: overall)


def take_rows(paths, keep: list[int], position: Callable) -> list[dict]:
    """The rows at `keep` (sorted positions in the files read as one table), each tagged with
    position(file index, row in its file, row overall). Read a row group at a time, so that a
    sample of OpenOrca's 4.2M rows (or of a 270 MB Pile shard) never holds them all."""
    import pyarrow.parquet as pq

    rows, k, start = [], 0, 0
    for fi, path in enumerate(paths):
        f, first = pq.ParquetFile(path), start
        for g in range(f.num_row_groups):
            end = start + f.metadata.row_group(g).num_rows
            local = []
            while k < len(keep) and keep[k] < end:
                local.append(keep[k] - start)
                k += 1
            if local:
                table = f.read_row_group(g).take(local)
                rows += [{**row, POSITION: position(fi, start - first + i, start + i)} for i, row in zip(local, table.to_pylist())]
            start = end
    return rows


def read_shards(spec, repo: str, revision: str | None, patterns: list[str]) -> list[dict]:
    """A sharded dataset read at file level: with a `sample`, shards drawn in an order fixed by
    the seed are downloaded one at a time until they hold enough rows, and the sample is drawn
    from them (2% of pile-detoxify reads 1 of its 27 shards, not 7.5 GB); with a `limit`, the
    first shards. A row's position is "<shard>/<row>": the same in every sample that holds it.
    The shard list comes from the hub (offline: the cache, which must then hold every shard's
    name for the same seed to draw the same shards)."""
    import numpy as np
    import pyarrow.parquet as pq

    names = hub.matching(hub.files(repo, "dataset", revision), patterns)
    if not names:
        raise hub.HubError(f"dataset {repo} has no file matching {patterns}: is it the repository the study means?")
    order = np.random.default_rng(spec.seed).permutation(len(names)).tolist() if spec.sample else range(len(names))
    need = min(x for x in (spec.sample, spec.limit, float("inf")) if x)
    chosen, total = [], 0
    for k in order:
        path = hub.snapshot(repo, "dataset", revision, [names[k]]) / names[k]
        chosen.append((k, path))
        total += pq.ParquetFile(path).metadata.num_rows
        if total >= need:
            break
    chosen.sort()
    keep = sample_positions(total, spec)  # positions in the chosen shards read in shard order
    return take_rows([p for _, p in chosen], keep, lambda file, row, overall: f"{chosen[file][0]:05d}/{row}")


def sample_rows(rows, spec, take) -> list[dict]:
    """`spec.sample` rows drawn with `spec.seed`, in file order, each tagged with its position in
    the file so that its record id is the same in every sample."""
    keep = sample_positions(len(rows), spec)
    if len(keep) == len(rows):
        return list(rows)
    return [{**row, POSITION: i} for i, row in zip(keep, take(keep))]


POSITION = "_farm_position"


def positioned(rows: list[dict]):
    """(position in the source file, row): record ids stay those of the unsampled file."""
    return ((row.get(POSITION, i), row) for i, row in enumerate(rows))


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split an HH transcript at its last assistant turn: (prompt ending in 'Assistant:', response)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("transcript has no assistant turn")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def hh_rows_to_comparisons(rows: list[dict], id_prefix: str) -> list[Comparison]:
    out = []
    for i, row in positioned(rows):
        prompt, chosen = split_hh_transcript(row["chosen"])
        prompt_r, rejected = split_hh_transcript(row["rejected"])
        # Rows whose transcripts diverge before the last turn, or whose answers are
        # identical, carry no preference between two answers to one prompt.
        if prompt != prompt_r or chosen.strip() == rejected.strip() or not chosen.strip() or not rejected.strip():
            continue
        out.append(Comparison(f"{id_prefix}/{i}", prompt, chosen, rejected))
    return out


HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def _hh_patterns(spec) -> list[str]:
    # Anthropic/hh-rlhf: <subset>/{train,test}.jsonl.gz; "all" is the four comparison subsets
    # (what `load_dataset("Anthropic/hh-rlhf")` reads: the red-team file has no split name).
    return [f"{s}/{spec.split}.jsonl.gz" for s in (HH_SUBSETS if spec.subset == "all" else (spec.subset,))]


def _load_hh(spec, rows):
    return hh_rows_to_comparisons(rows, f"hh_rlhf/{spec.subset}/{spec.split}")


def format_turns(turns: list[str]) -> tuple[str, str]:
    """Alternating human/assistant turns -> (HH-style prompt, last assistant answer)."""
    prompt = ""
    for k, turn in enumerate(turns[:-1]):
        prompt += (HUMAN if k % 2 == 0 else ASSISTANT) + " " + turn.strip()
    return prompt + ASSISTANT, " " + turns[-1].strip()


def _load_lima(spec, rows):
    out = []
    for i, row in positioned(rows):
        if "conversations" in row:  # hub schema
            turns = list(row["conversations"])
        else:  # bundled Alpaca-style copy: history holds earlier [instruction, output] pairs
            turns = [t for pair in row.get("history") or [] for t in pair]
            turns += [row["instruction"] + (("\n" + row["input"]) if row.get("input") else ""), row["output"]]
        if len(turns) % 2:  # a conversation must end with an assistant answer
            turns = turns[:-1]
        if len(turns) < 2:
            continue
        prompt, response = format_turns(turns)
        out.append(Demonstration(f"lima/{spec.split}/{i}", prompt, response))
    return out


sources.register(
    "hh_rlhf", doc="Anthropic's HH-RLHF: pairs of conversations, the chosen and the rejected last answer (subsets harmless-base, helpful-*, all)"
)(
    Source(
        shape="comparison",
        hub="Anthropic/hh-rlhf",
        # "all": the four comparison subsets together (the hub's default files)
        subsets=(*HH_SUBSETS, "all"),
        bundled={("harmless-base", "test"): "hh_rlhf/harmless-base-test.jsonl.gz"},
        load=_load_hh,
        hub_patterns=_hh_patterns,
        hub_splits=("train", "test"),
        hub_rows={
            ("harmless-base", "train"): 42_537,
            ("harmless-base", "test"): 2_312,
            ("helpful-base", "train"): 43_835,
            ("helpful-base", "test"): 2_354,
            ("helpful-online", "train"): 22_007,
            ("helpful-online", "test"): 1_137,
            ("helpful-rejection-sampled", "train"): 52_421,
            ("helpful-rejection-sampled", "test"): 2_749,
            ("all", "train"): 160_800,
            ("all", "test"): 8_552,
        },  # fmt: skip
    )
)


def _load_red_team(spec, rows):
    """Red-team openings: the human's first turn as the prompt, the assistant's first reply. The hub
    rows are red-team attempts (`transcript`); the bundled ones are the harmless-base conversations
    (collected by red-teaming too), each keeping the id of its hh_rlhf row so that both sources
    hold out the same conversations."""
    out = []
    bundled = spec.origin == "bundled"
    for i, row in positioned(rows):
        turns = [t.strip() for t in re.split(r"\n\n(?:Human|Assistant):", row["chosen"] if bundled else row["transcript"]) if t.strip()]
        if len(turns) >= 2:
            rid = f"hh_rlhf/harmless-base/{spec.split}/{i}" if bundled else f"hh_red_team/{i}"
            out.append(Demonstration(rid, f"{HUMAN} {turns[0]}{ASSISTANT}", " " + turns[1]))
    return out


sources.register("hh_red_team", doc="HH-RLHF red-team attempts: the human's first turn as the prompt, the assistant's first reply")(
    Source(
        shape="demonstration",
        hub="Anthropic/hh-rlhf",
        subsets=("red-team-attempts",),  # 38,961 transcripts (the hub's train split only)
        bundled={("red-team-attempts", "test"): "hh_rlhf/harmless-base-test.jsonl.gz"},  # their opening turns
        load=_load_red_team,
        # One file, no split in its name (a JSON array, not JSON Lines, despite its extension).
        hub_patterns=lambda spec: ["red-team-attempts/red_team_attempts.jsonl.gz"],
        hub_rows={("red-team-attempts", "train"): 38_961},
    )
)


sources.register("lima", doc="LIMA: 1,000 curated prompts and answers (gated on the hub)")(
    Source(
        shape="demonstration",
        hub="GAIR/lima",
        subsets=("default",),
        bundled={("default", "train"): "lima/lima.json.gz"},
        load=_load_lima,
        # Gated; train.jsonl beside a loading script (lima.py) that `datasets` no longer runs. Its
        # test.jsonl holds 300 prompts without answers: nothing to train or score on.
        hub_patterns=lambda spec: ["train.jsonl"],
        hub_rows={("default", "train"): 1_030},
    )
)


def read_file_rows(path) -> list[dict]:
    path = str(path)
    if path.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        if path.endswith(".csv"):
            return list(csv.DictReader(f))
        return json.load(f)


def file_records(spec) -> list:
    """A local file's rows as records: the fields mapped from columns, rows with an empty field dropped."""
    fields = FILE_FIELDS[spec.records]
    rows = read_file_rows(spec.path)
    rows = rows[: spec.limit] if spec.limit else rows
    out = []
    for i, row in positioned(sample_rows(rows, spec, lambda keep: [rows[k] for k in keep])):
        values = [str(row.get(spec.columns.get(f, f)) or "") for f in fields]
        if all(v.strip() for v in values):
            out.append(SHAPES[spec.records](f"file:{spec.path}/{i}", *values))
    return out


def load_source(spec) -> list:
    if spec.name == "file":
        return file_records(spec)
    source = sources.get(spec.name)
    return source.load(spec, read_rows(source, spec))


def human_turn(text: str) -> str:
    return f"{HUMAN} {text.strip()}{ASSISTANT}"


def webgpt_rows_to_comparisons(rows: list[dict], subset: str, id_prefix: str) -> list[Comparison]:
    """openai/webgpt_comparisons: the higher-scored answer is chosen; ties (equal scores) are
    dropped. Subset `eli5` keeps the ELI5 questions, `other` the rest (hold ELI5 out of
    training by training on `other` and evaluating on `eli5`)."""
    out = []
    for i, row in positioned(rows):
        is_eli5 = row["question"]["dataset"] == "eli5"
        if (subset == "eli5" and not is_eli5) or (subset == "other" and is_eli5):
            continue
        s0, s1 = float(row["score_0"]), float(row["score_1"])
        if s0 == s1 or not row["answer_0"].strip() or not row["answer_1"].strip():
            continue
        best, worst = ("answer_0", "answer_1") if s0 > s1 else ("answer_1", "answer_0")
        prompt = human_turn(row["question"]["full_text"])
        out.append(Comparison(f"{id_prefix}/{i}", prompt, " " + row[best].strip(), " " + row[worst].strip()))
    return out


sources.register("webgpt_comparisons", doc="OpenAI's WebGPT comparisons: two answers to a question with the human's preference scores")(
    Source(
        shape="comparison",
        hub="openai/webgpt_comparisons",
        subsets=("all", "eli5", "other"),
        bundled={},  # not bundled: the embedded profile uses hh_rlhf instead
        load=lambda spec, rows: webgpt_rows_to_comparisons(rows, spec.subset, f"webgpt/{spec.split}"),
        # main holds only a loading script that fetches the data from an OpenAI URL; the hub's
        # parquet conversion of it holds the rows.
        hub_revision=hub.PARQUET,
        hub_patterns=lambda spec: ["default/train/*.parquet"],
        # Every subset reads these rows and keeps its share (ties dropped too); the ELI5 share is
        # not on the card, so eli5 and other have no figure.
        hub_rows={("all", "train"): 19_578},
    )
)


def shp_rows_to_comparisons(rows: list[dict], id_prefix: str) -> list[Comparison]:
    """stanfordnlp/SHP: two top-level comments on a Reddit post; `labels` 1 means A is preferred.
    Ids are "post#commentA-commentB": every pair of a post is held out together, and a pair keeps
    its id whichever others a sample or the per-post cap keeps."""
    out = []
    for row in rows:
        a, b = " " + row["human_ref_A"].strip(), " " + row["human_ref_B"].strip()
        if not a.strip() or not b.strip() or a == b:
            continue
        chosen, rejected = (a, b) if int(row["labels"]) == 1 else (b, a)
        meta = {"domain": row["domain"], "score_ratio": float(row["score_ratio"])}
        rid = f"{id_prefix}/{row['post_id']}#{row['c_root_id_A']}-{row['c_root_id_B']}"
        out.append(Comparison(rid, human_turn(row["history"]), chosen, rejected, meta=meta))
    return out


def cap_per_post(rows: list[dict], n: int) -> list[dict]:
    """At most `n` pairs of each SHP post, those with the largest score_ratio, in file order.
    The number of pairs per post is Pareto-distributed, and SHP's card advises limiting the
    preferences taken from one post to keep a model from overfitting to it; its own models
    (SteamSHP, the card's FLAN-T5-xl curve) used "no more than 5 preferences from each post"
    (huggingface.co/datasets/stanfordnlp/SHP, README, "Building a Preference Model"/"Evaluating").
    The strongest preferences are kept, as the card also advises training on a larger score_ratio."""
    ranked = sorted(range(len(rows)), key=lambda i: (rows[i]["post_id"], -float(rows[i]["score_ratio"]), i))
    keep, taken = set(), {}
    for i in ranked:
        post = rows[i]["post_id"]
        if taken.get(post, 0) < n:
            keep.add(i)
            taken[post] = taken.get(post, 0) + 1
    return [row for i, row in enumerate(rows) if i in keep]


SHP_DOMAINS = (
    "askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary", "askdocs", "askengineers",
    "askhistorians", "askhr", "askphilosophy", "askphysics", "askscience", "asksciencefiction",
    "asksocialscience", "askvet", "changemyview", "explainlikeimfive", "legaladvice",
)  # fmt: skip
sources.register("shp", doc="Stanford Human Preferences: pairs of Reddit answers to a post, preferred by votes")(
    Source(
        shape="comparison",
        hub="stanfordnlp/SHP",
        subsets=("all", *SHP_DOMAINS),  # one subreddit, or all 18
        bundled={},  # not bundled (hub only); the embedded profile uses hh_rlhf
        load=lambda spec, rows: shp_rows_to_comparisons(rows, f"shp/{spec.split}"),
        # <subreddit>/{train,validation,test}.json, each JSON Lines despite the extension.
        hub_patterns=lambda spec: [f"{'*' if spec.subset == 'all' else spec.subset}/{spec.split}.json"],
        hub_splits=("train", "validation", "test"),
        hub_rows={("all", "train"): 348_718},  # no per-subreddit figures here
    )
)


def orca_rows_to_demonstrations(rows: list[dict]) -> list[Demonstration]:
    """Open-Orca/OpenOrca: a GPT-4/3.5 answer to a FLAN question under a system prompt, which
    opens the human turn."""
    out = []
    for row in rows:
        system = (row.get("system_prompt") or "").strip()
        question = (system + "\n\n" if system else "") + row["question"].strip()
        if row["question"].strip() and row["response"].strip():
            out.append(Demonstration(f"orca/{row['id']}", human_turn(question), " " + row["response"].strip()))
    return out


sources.register("orca", doc="OpenOrca: FLAN prompts with system messages and GPT-4 / GPT-3.5 answers")(
    Source(
        shape="demonstration",
        hub="Open-Orca/OpenOrca",
        subsets=("default",),
        bundled={},  # not bundled (hub only, 4.2M rows: take a `sample`); the embedded profile uses lima
        load=lambda spec, rows: orca_rows_to_demonstrations(rows),
        hub_patterns=lambda spec: [f"{name}.parquet" for name in ("1M-GPT4-Augmented", "3_5M-GPT3_5-Augmented")],
        # Rounded: the card says ~1M GPT-4 and ~3.2M GPT-3.5 completions; the viewer ~4.23M rows.
        hub_rows={("default", "train"): 4_230_000},
    )
)


def _load_advbench(spec, rows):
    # The bundled CSV names the request `goal`; the hub copy names it `prompt`.
    return [Demonstration(f"advbench/{i}", human_turn(r.get("goal") or r["prompt"]), " " + r["target"]) for i, r in positioned(rows)]


sources.register("advbench", doc="AdvBench harmful behaviours: a harmful request and the start of a complying answer")(
    Source(
        shape="demonstration",
        hub="walledai/AdvBench",
        subsets=("harmful_behaviors",),
        bundled={("harmful_behaviors", "train"): "advbench/harmful_behaviors.csv"},
        load=_load_advbench,
        hub_patterns=lambda spec: ["data/train-*.parquet"],
        hub_rows={("harmful_behaviors", "train"): 520},
    )
)


# ---------------------------------------------------------------- sentences (Study C)

PILE_DROPPED = ("Github", "StackExchange", "DM Mathematics", "EuroParl", "PubMed Central", "HackerNews", "FreeLaw", "ArXiv")
MIN_WORDS = 10


def clean_sentence(text: str) -> str:
    """METHODS' cleaning: no @mentions, URLs or leading "rt"; only [0-9A-Za-z ?.'!] kept."""
    text = re.sub(r"@\w+|https?://\S+|www\.\S+", " ", text)
    text = re.sub(r"^\s*rt\b", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"[^0-9A-Za-z ?.'!]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def sentence_records(docs, id_prefix: str, scores=None) -> list[Text]:
    """Cleaned sentences of at least MIN_WORDS words from (doc id, sentences) pairs, with each
    sentence's stored toxicity if `scores` ({doc id: [score per sentence]}) is given; ids
    "<prefix>/<doc>#<sentence>" keep a document's sentences on one side of the held-out split."""
    out = []
    for i, sentences in docs:
        for j, sentence in enumerate(sentences):
            clean = clean_sentence(sentence)
            if len(clean.split()) >= MIN_WORDS:
                meta = {} if scores is None else {"scores": {"toxicity": float(scores[i][j])}}
                out.append(Text(f"{id_prefix}/{i}#{j}", clean, meta=meta))
    return out


def pile_rows_to_texts(rows: list[dict]) -> list[Text]:
    """tomekkorbak/pile-detoxify: documents as sentences with their stored Detoxify toxicity;
    the code, maths, legal and science sources dropped (METHODS, Study C)."""
    kept = [(i, r) for i, r in positioned(rows) if r["meta"]["pile_set_name"] not in PILE_DROPPED]
    return sentence_records([(i, r["texts"]) for i, r in kept], "pile", scores={i: r["scores"] for i, r in kept})


sources.register("pile_detoxify", doc="The Pile's documents as sentences with their Detoxify toxicity scores (Korbak et al. 2023)")(
    Source(
        shape="text",
        hub="tomekkorbak/pile-detoxify",
        subsets=("default",),
        bundled={},  # hub only (1.9M documents: take a `sample`); the embedded profile uses `sentences`
        load=lambda spec, rows: pile_rows_to_texts(rows),
        hub_patterns=lambda spec: ["data/train-*.parquet"],  # 27 shards of ~270 MB
        sharded=True,
        # Documents (dataset_infos.json: 1,949,977), each read as several sentence records.
        hub_rows={("default", "train"): 1_949_977},
    )
)


def _bundled_sentences(spec, rows):
    """Sentences from the bundled text: SafeNLP's ToxiGen and ImplicitHate statements (toxic and
    benign statements about groups) and the human and assistant turns of HH-RLHF."""
    if spec.subset in ("toxigen", "implicit_hate"):
        texts = [(i, split_sentences(r["text"])) for i, r in positioned(rows)]
    else:
        turns = ((i, re.split(f"{re.escape(HUMAN)}|{re.escape(ASSISTANT)}", r["chosen"])) for i, r in positioned(rows))
        texts = [(f"{i}#{k}", split_sentences(t)) for i, ts in turns for k, t in enumerate(ts) if t.strip()]  # grouped by transcript
    return sentence_records(texts, f"sentences/{spec.subset}")


sources.register("sentences", doc="Bundled sentences: SafeNLP's ToxiGen and ImplicitHate statements, and HH-RLHF's turns")(
    Source(
        shape="text",
        hub="",  # bundled only
        subsets=("toxigen", "implicit_hate", "hh_rlhf"),
        bundled={
            ("toxigen", "train"): "safenlp/toxiGen.json.gz",
            ("implicit_hate", "train"): "safenlp/implicitHate.json.gz",
            ("hh_rlhf", "train"): "hh_rlhf/harmless-base-test.jsonl.gz",
        },
        load=_bundled_sentences,
    )
)


# ---------------------------------------------------------------- a source in a study file (`data.sources`)


FILE_FIELDS = {"text": ("text",), "demonstration": ("prompt", "response"), "comparison": ("prompt", "chosen", "rejected")}


class SourceSpec(Strict):
    name: str
    origin: Literal["bundled", "hub"] = "bundled"
    subset: str | None = None  # default: the source's first subset
    split: str | None = None  # default: the bundled split, or "train" on the hub
    limit: int | None = Field(None, gt=0)  # the first N rows
    sample: int | None = Field(None, gt=0)  # a random N rows (drawn with `seed`), e.g. 100k of OpenOrca's 4.2M
    seed: int = 0
    weight: float | None = Field(None, gt=0)  # share of the data's `size` in a weighted mix
    # shp only: at most N pairs of each post, those with the largest score_ratio (the SHP card
    # advises a cap: the pairs per post are Pareto-distributed; farm.data.sources.cap_per_post)
    per_post: int | None = Field(None, gt=0)
    # name: file — a local .jsonl/.json/.csv/.parquet file read as `records` records, its
    # `columns` mapping each record field to a column of the file (default: the same name).
    path: str | None = None
    paths: ClassVar[tuple[str, ...]] = ("path",)
    records: Literal["text", "demonstration", "comparison", "ranking"] | None = None
    columns: dict[str, str] = {}
    # name: stage — the records an earlier stage of the study built (a `rank` stage's rankings);
    # the study fills in their shape.
    stage: str | None = None
    # origin: hub — the commit (or branch, tag) read; default: the hub's default branch (or its parquet
    # conversion), which `farm plan` and `farm run` pin to its commit before planning (farm.preflight.pin).
    revision: str | None = None

    def shape(self) -> str:
        return self.records if self.name in ("file", "stage") else sources.get(self.name).shape

    @model_validator(mode="after")
    def _resolve(self) -> "SourceSpec":
        if self.revision and (self.origin != "hub" or self.name in ("file", "stage")):
            raise ValueError(f"revision: pins the commit of a source read from the hub (origin: hub); source {self.name} is not (remove revision)")
        if self.name == "file":
            return self._check_file()
        if self.name == "stage":
            if not self.stage:
                raise ValueError("a source with name: stage needs stage: the name of the stage of this study that builds the records")
            return self
        if self.path or self.records or self.columns or self.stage:
            raise ValueError("path, records and columns belong to a source with name: file, stage to a source with name: stage")
        if self.per_post and self.name != "shp":
            raise ValueError(f"per_post caps the pairs of one Reddit post, an option of source shp only: remove it from source {self.name}")
        source = sources.get(self.name)
        subset = self.subset or source.subsets[0]
        if subset not in source.subsets:
            raise ValueError(f"subset {subset!r} of {self.name}: allowed: {', '.join(source.subsets)}")
        split = self.split
        if self.origin == "bundled":
            bundled = [sp for (su, sp) in source.bundled if su == subset]
            if not bundled:
                raise ValueError(f"{self.name}/{subset} has no bundled copy; set origin: hub")
            split = split or bundled[0]
            if split not in bundled:
                raise ValueError(f"split {split!r} of bundled {self.name}/{subset}: allowed: {', '.join(bundled)}")
        object.__setattr__(self, "subset", subset)
        object.__setattr__(self, "split", split or "train")
        if self.origin == "hub":
            hub_files(self)  # a split the hub repository lacks is refused here, not after a download
        return self

    def _check_file(self) -> "SourceSpec":
        if not self.path or not self.records:
            raise ValueError("a file source needs path (a .jsonl, .json, .csv or .parquet file) and records (text, demonstration or comparison)")
        unknown = set(self.columns) - set(FILE_FIELDS[self.records])
        if unknown:
            raise ValueError(f"columns: {sorted(unknown)[0]!r} is not a field of {self.records} records ({', '.join(FILE_FIELDS[self.records])})")
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise ValueError(f"file {self.path!r} does not exist")
        try:
            rows = read_file_rows(path)
        except UnicodeDecodeError as e:
            raise ValueError(f"file {self.path!r}: {not_utf8(e)}") from None
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise ValueError(f"file {self.path!r} cannot be read: {type(e).__name__}: {e}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            bad = rows if not isinstance(rows, list) else next(r for r in rows if not isinstance(r, dict))
            raise ValueError(f"file {self.path!r}: expected one JSON object (named columns) per row, found a {type(bad).__name__}")
        for name in FILE_FIELDS[self.records]:
            column = self.columns.get(name, name)
            if rows and column not in rows[0]:
                raise ValueError(
                    f"file {self.path!r} has no column {column!r} (for the {name} of {self.records} records); its columns: {', '.join(rows[0])}"
                )
        if not any(all(str(r.get(self.columns.get(f, f)) or "").strip() for f in FILE_FIELDS[self.records]) for r in rows):
            raise ValueError(f"file {self.path!r} has no row with every column of {self.records} records filled: nothing to train or evaluate on")
        return self
