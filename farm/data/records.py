"""The four record shapes every dataset is read into, and the conversions between them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from farm.files import atomic_write


@dataclass(frozen=True)
class Text:
    id: str
    text: str
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Demonstration:
    id: str
    prompt: str
    response: str
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Comparison:
    id: str
    prompt: str
    chosen: str
    rejected: str
    # P(chosen is preferred); 1.0 for hard human labels, soft for AI feedback.
    label: float = 1.0
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Ranking:
    id: str
    prompt: str
    responses: tuple[str, ...]  # sorted best first
    rewards: tuple[float, ...]
    meta: dict = field(default_factory=dict, compare=False)


SHAPES = {"text": Text, "demonstration": Demonstration, "comparison": Comparison, "ranking": Ranking}
# Which shapes a record can be read as (a comparison teaches by its chosen answer).
CONVERTIBLE = {
    "text": {"text"},
    "demonstration": {"demonstration", "text"},
    "comparison": {"comparison", "demonstration", "text"},
    "ranking": {"ranking", "comparison", "demonstration", "text"},
}


def shape_of(record) -> str:
    return next(name for name, cls in SHAPES.items() if isinstance(record, cls))


def convert(records: list, shape: str) -> list:
    """Read records as `shape`: demonstrations keep the preferred answer, texts the full transcript."""
    return [_convert_one(r, shape) for r in records]


def _convert_one(r, shape: str):
    src = shape_of(r)
    if src == shape:
        return r
    if shape not in CONVERTIBLE[src]:
        raise ValueError(f"a {src} record cannot be used as {shape} data")
    if src == "ranking":
        r = Comparison(r.id, r.prompt, r.responses[0], r.responses[-1], meta=r.meta)
        return _convert_one(r, shape)
    if src == "comparison":
        r = Demonstration(r.id, r.prompt, r.chosen, meta=r.meta)
        return _convert_one(r, shape)
    return Text(r.id, r.prompt + r.response, meta=r.meta)  # demonstration -> text


def write_records(path, records: list) -> None:
    """Records as JSON lines (shape, fields), written atomically: a stage's built data."""
    import json

    lines = [json.dumps({"shape": shape_of(r), **dataclasses.asdict(r)}, ensure_ascii=False) for r in records]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def read_records(path) -> list:
    import json

    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            cls = SHAPES[row.pop("shape")]
            if cls is Ranking:
                row["responses"], row["rewards"] = tuple(row["responses"]), tuple(row["rewards"])
            out.append(cls(**row))
    return out


RECORDS_FILE = "records.jsonl"  # the records a stage that builds data writes
