"""Transforms: pure functions `(records, params, rng) -> records`, seeded from the trial seed.

A transform marks each record it changed with `meta["perturbed"] = <transform name>`, so a
trial can report exactly which rows were perturbed and the realised rate stays auditable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from farm.registry import transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    fn: object
    shape: str  # the record shape it works on


def register(name: str, shape: str):
    def add(fn):
        transforms.register(name)(Transform(fn, shape))
        return fn

    return add


def mark(record, name: str, **changes):
    return dataclasses.replace(record, meta={**record.meta, "perturbed": name}, **changes)


@register("label_flip", shape="comparison")
def label_flip(records: list, params, rng: np.random.Generator) -> list:
    """Swap chosen and rejected with probability `rate`, one Bernoulli draw per row.

    The draws are made for every row whatever the rate, so with one seed the rows flipped
    at a lower rate are a subset of those flipped at a higher one.
    """
    draws = rng.random(len(records))
    return [
        mark(r, "label_flip", chosen=r.rejected, rejected=r.chosen, label=1.0 - r.label) if u < params.rate else r
        for r, u in zip(records, draws)
    ]
