"""From a data spec to the records a stage trains on or an eval scores: load the sources,
split off the held-out rows, perturb the training rows (seeded), convert the shape."""

from __future__ import annotations

import dataclasses
import hashlib
import zlib

import numpy as np

from farm.data.records import convert
from farm.data.sources import load_source
from farm.registry import transforms


def _position(record_id: str, split_seed: int) -> float:
    """A row's place in [0, 1), by a hash of its id; ids "group#n" by their group, so that the
    answers to one prompt (SHP's pairs of one post) all fall on the same side of every split."""
    digest = hashlib.sha256(f"{split_seed}:{record_id.split('#')[0]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(record_id: str, holdout: float, split_seed: int) -> bool:
    return _position(record_id, split_seed) < holdout


def part_of(record_id: str, data) -> str:
    """ "dev", "eval" or "train": the held-out rows are the first `holdout` of the hash order, their
    first `dev` share the dev rows. With dev = 0 the eval rows are all the held-out rows, as before
    dev rows existed, and a row's side never depends on the other rows."""
    u = _position(record_id, data.split_seed)
    return "dev" if u < data.holdout * data.dev else "eval" if u < data.holdout else "train"


def load_split(data, part: str, scores: dict | None = None, built: dict | None = None) -> list:
    """Rows of every source in `data` that fall in `part`: "train", "eval", "dev" or "heldout"
    (dev and eval rows); training rows of a weighted mix (`data.size`) in the shares of the
    sources' weights. `scores` ({row id: {column: value}}, from the labelling stage) join each
    row's `meta["scores"]`. `built` holds the records of earlier stages ({stage name: records})
    for `name: stage` sources: a stage builds them from training rows, so they are all training rows."""
    want_train = part == "train"
    parts = {"heldout": ("dev", "eval")}.get(part, (part,))

    def rows(s):
        if s.name == "stage":
            return built[s.stage] if want_train else []
        return [r for r in load_source(s) if part_of(r.id, data) in parts]

    parts = [rows(s) for s in data.sources]
    if scores is not None:
        parts = [with_scores(rows, scores) for rows in parts]
    if data.size and want_train:
        parts = [_draw(rows, n, data.split_seed, s) for rows, n, s in zip(parts, mix_counts(data), data.sources)]
    return [r for rows in parts for r in rows]


def with_scores(records: list, scores: dict) -> list:
    """Records with their labels added to `meta["scores"]` (beside scores a source carries)."""
    missing = next((r.id for r in records if r.id not in scores), None)
    if missing is not None:
        raise ValueError(f"row {missing} has no labels: the labelling stage did not score it")
    return [dataclasses.replace(r, meta={**r.meta, "scores": {**r.meta.get("scores", {}), **scores[r.id]}}) for r in records]


def mix_counts(data) -> list[int]:
    """Rows each source gives to a mix of `data.size` rows: shares of the weights, rounded so
    that they add up to the size (largest remainders first)."""
    weights = np.array([s.weight or 1.0 for s in data.sources])
    exact = data.size * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: data.size - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _draw(rows: list, n: int, seed: int, source) -> list:
    if n > len(rows):
        raise ValueError(f"data mix: source {source.name} has {len(rows)} training rows, fewer than its share {n} of size; lower size or its weight")
    keep = np.random.default_rng([seed, zlib.crc32(source.name.encode())]).choice(len(rows), n, replace=False)
    return [rows[i] for i in sorted(keep)]


def transform_rng(seed: int, name: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index])


def training_records(data, seed: int, shape: str, scores: dict | None = None, built: dict | None = None) -> tuple[list, dict]:
    """The perturbed training rows (or, with `data.rows: heldout`, the held-out ones) read as
    `shape`, and an audit of what each transform changed."""
    records = load_split(data, data.rows, scores, built)
    audit = {"train_rows": len(records)}
    for i, spec in enumerate(data.transforms):
        records = transforms.get(spec.name).fn(records, spec, transform_rng(seed, spec.name, i))
    changed = sorted(r.id for r in records if r.meta.get("perturbed"))
    audit.update(perturbed_rows=len(changed), perturbed_ids=changed)
    return convert(records, shape) if shape else records, audit


def eval_records(study, shape: str | None = None, scores: dict | None = None) -> list:
    """Clean rows to evaluate on: all of `eval.data` if given, else the study data's held-out
    rows that are not dev rows, or with `eval.rows: dev` the dev rows (with their labels, if the
    study data is labelled); read as `shape`, or as the sources give them."""
    ev = study.eval
    records = [r for s in ev.data.sources for r in load_source(s)] if ev.data else load_split(study.data, ev.rows, scores)
    if ev.limit:
        records = records[: ev.limit]
    return convert(records, shape) if shape else records


def dev_records(study, shape: str | None, limit: int | None = None) -> list:
    """The study data's dev rows, where a stage chooses its checkpoint (`select`)."""
    records = load_split(study.data, "dev")[:limit]
    return convert(records, shape) if shape else records
