"""Dataset sources: each maps a published schema onto one record shape.

A source reads either the copy bundled in `farm/assets` (the embedded profile, offline)
or the Hugging Face hub (a cluster). Both paths produce identical record shapes.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from farm.data.records import Comparison, Demonstration
from farm.registry import sources

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass(frozen=True)
class Source:
    shape: str
    hub: str
    subsets: tuple[str, ...]
    bundled: dict[tuple[str, str], str]  # (subset, split) -> asset path
    load: Callable  # (spec, rows) -> records


def asset_path(rel: str):
    return resources.files("farm.assets").joinpath(rel)


def read_asset_lines(rel: str) -> list[str]:
    with asset_path(rel).open("rb") as f:
        raw = gzip.decompress(f.read()) if rel.endswith(".gz") else f.read()
    return raw.decode("utf-8").splitlines()


def read_rows(source: Source, spec) -> list[dict]:
    """Rows of one (subset, split) from the bundled copy or the hub, in a fixed order."""
    if spec.origin == "bundled":
        rel = source.bundled[(spec.subset, spec.split)]
        if rel.endswith((".jsonl", ".jsonl.gz")):
            rows = [json.loads(line) for line in read_asset_lines(rel) if line.strip()]
        else:
            rows = json.loads("\n".join(read_asset_lines(rel)))
    else:
        import datasets

        # Multi-subset hub datasets keep each subset in its own folder (data_dir).
        data_dir = spec.subset if spec.subset != "default" else None
        rows = list(datasets.load_dataset(source.hub, data_dir=data_dir, split=spec.split))
    return rows[: spec.limit] if spec.limit else rows


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split an HH transcript at its last assistant turn: (prompt ending in 'Assistant:', response)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("transcript has no assistant turn")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def hh_rows_to_comparisons(rows: list[dict], id_prefix: str) -> list[Comparison]:
    out = []
    for i, row in enumerate(rows):
        prompt, chosen = split_hh_transcript(row["chosen"])
        prompt_r, rejected = split_hh_transcript(row["rejected"])
        # Rows whose transcripts diverge before the last turn, or whose answers are
        # identical, carry no preference between two answers to one prompt.
        if prompt != prompt_r or chosen.strip() == rejected.strip() or not chosen.strip() or not rejected.strip():
            continue
        out.append(Comparison(f"{id_prefix}/{i}", prompt, chosen, rejected))
    return out


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
    for i, row in enumerate(rows):
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


sources.register("hh_rlhf")(
    Source(
        shape="comparison",
        hub="Anthropic/hh-rlhf",
        subsets=("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"),
        bundled={("harmless-base", "test"): "hh_rlhf/harmless-base-test.jsonl.gz"},
        load=_load_hh,
    )
)
sources.register("lima")(
    Source(shape="demonstration", hub="GAIR/lima", subsets=("default",), bundled={("default", "train"): "lima/lima.json.gz"}, load=_load_lima)
)


def load_source(spec) -> list:
    source = sources.get(spec.name)
    return source.load(spec, read_rows(source, spec))
