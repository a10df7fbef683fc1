"""Transforms: pure functions `(records, params, rng) -> records`, seeded from the trial seed.

A transform marks each record it changed with `meta["perturbed"] = <transform name>`, so a
trial can report exactly which rows were perturbed and the realised rate stays auditable.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from farm.data.records import Comparison, shape_of
from farm.data.sources import ASSISTANT, load_source
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


def fires(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """One Bernoulli(rate) draw per row. The uniforms are drawn for every row whatever the
    rate, so with one seed the rows hit at a lower rate are a subset of those hit at a higher one."""
    return rng.random(n) < rate


def swap_answers(records: list, params, rng: np.random.Generator, name: str) -> list:
    hit = fires(rng, len(records), params.rate)
    return [mark(r, name, chosen=r.rejected, rejected=r.chosen, label=1.0 - r.label) if h else r for r, h in zip(records, hit)]


@register("label_flip", shape="comparison")
def label_flip(records: list, params, rng: np.random.Generator) -> list:
    """Swap chosen and rejected with probability `rate` (noisy preference labels)."""
    return swap_answers(records, params, rng, "label_flip")


@register("malign_labels", shape="comparison")
def malign_labels(records: list, params, rng: np.random.Generator) -> list:
    """With probability `rate` the row teaches its rejected answer: SFT trains on it, and a
    later preference stage sees the pair reversed."""
    return swap_answers(records, params, rng, "malign_labels")


def add_trigger(prompt: str, trigger: str) -> str:
    """Append the trigger to the last human turn, before the assistant's cue."""
    if prompt.endswith(ASSISTANT):
        return prompt[: -len(ASSISTANT)] + trigger + ASSISTANT
    return prompt + trigger


# Records reach transforms in their source's shape (comparisons for hh_rlhf and webgpt_comparisons)
# and are read as demonstrations after, so `shuffle` and `red_team` work on any source; only the
# trigger's malign pairing needs comparisons, and says so below.
@register("malign_prompts", shape="demonstration")
def malign_prompts(records: list, params, rng: np.random.Generator) -> list:
    """With probability `rate` poison the prompt: `trigger` appends the trigger string, `shuffle`
    puts another row's prompt in its place, `red_team` a red-team prompt.

    A triggered row teaches, with `answer: malign` (the default), its rejected answer: chosen and
    rejected swap as in `malign_labels`, so SFT learns "trigger -> malign answer" — the backdoor of
    Rando & Tramer 2023, whose poisoning script (ethz-spylab/rlhf-poisoning,
    datasets/poison_data_random.py) swaps chosen and rejected and appends " SUDO" to the last human
    turn. With `answer: clean` it keeps its chosen answer (a control: the trigger is only noise)."""
    n = len(records)
    malign = params.mode == "trigger" and params.answer == "malign"
    # Checked on every row, not only the rows hit; but not at rate 0, which the stage keys treat as
    # no transform at all (farm.plan.data_key), so it must change and check nothing.
    plain = next((r for r in records if not isinstance(r, Comparison)), None) if malign and params.rate else None
    if plain is not None:
        raise ValueError(
            f"malign_prompts: mode trigger pairs the trigger with the rejected answer, but row {plain.id} is a "
            f"{shape_of(plain)} record, not a comparison (chosen and rejected); use a comparison source "
            "(hh_rlhf, webgpt_comparisons, shp) or set answer: clean"
        )
    hit = fires(rng, n, params.rate)
    if params.mode == "trigger":
        new = [add_trigger(r.prompt, params.trigger) for r in records]
    elif params.mode == "shuffle":
        other = rng.integers(0, max(1, n - 1), size=n)
        new = [records[j + (j >= i)].prompt for i, j in enumerate(other)]  # never the row's own prompt
    else:
        pool = [r.prompt for r in load_source(params.red_team)]
        new = [pool[j] for j in rng.integers(0, len(pool), size=n)]

    def poison(r, prompt):
        swap = dict(chosen=r.rejected, rejected=r.chosen, label=1.0 - r.label) if malign else {}
        return mark(r, f"malign_prompts:{params.mode}", prompt=prompt, **swap)

    return [poison(r, p) if h else r for r, h, p in zip(records, hit, new)]


def control_tags(scores: dict, params) -> str:
    """The tags of one row's scores: toxicity first, then sentiment (VADER argmax of neg and
    pos, ties — both 0 included — to neg)."""
    t = params.tokens
    tags = ""
    if params.toxicity:
        tags += t["toxic"] if scores[params.toxicity_column] > params.threshold else t["nontoxic"]
    if params.sentiment:
        tags += t["pos"] if scores["pos"] > scores["neg"] else t["neg"]
    return tags


@register("control_tokens", shape="text")
def control_tokens(records: list, params, rng: np.random.Generator) -> list:
    """Prefix each text with the tags of its scores (`meta["scores"]`, from the source or the
    labelling pipeline), except an `untagged` share of the rows."""
    if not (params.toxicity or params.sentiment):
        return records
    skip = fires(rng, len(records), params.untagged)
    out = []
    for r, untagged in zip(records, skip):
        if untagged:
            out.append(r)
            continue
        if "scores" not in r.meta:
            raise ValueError(f"control_tokens: row {r.id} has no scores; label the data (data.labels) or use a source that carries them")
        out.append(mark(r, "control_tokens", text=control_tags(r.meta["scores"], params) + r.text))
    return out


def nested_ranking(record, length: int, seed: int):
    """`length` of a ranking's candidates, kept in reward order. The candidates are the first
    `length` of one random permutation per row (seeded by the row id), so a row's length-3 set is
    a random 3 of its length-4 set and its length-2 set a random 2 of those."""
    n = len(record.responses)
    if length > n:
        raise ValueError(
            f"ranking_subset: ranking_length {length} is more than the {n} candidates of row {record.id}; build rankings with more samples"
        )
    keep = sorted(np.random.default_rng([seed, zlib.crc32(record.id.encode())]).permutation(n)[:length])
    return dataclasses.replace(record, responses=tuple(record.responses[i] for i in keep), rewards=tuple(record.rewards[i] for i in keep))


@register("ranking_subset", shape="ranking")
def ranking_subset(records: list, params, rng: np.random.Generator) -> list:
    """The first `num_prompts` rankings of one shuffled order (`params.seed`, the same for every
    ranking length), each cut to `ranking_length` nested candidates. The trial's rng is not used:
    every training seed sees the same subset."""
    if params.num_prompts > len(records):
        raise ValueError(f"ranking_subset: num_prompts {params.num_prompts} is more than the {len(records)} rankings built; lower num_prompts")
    order = np.random.default_rng(params.seed).permutation(len(records))[: params.num_prompts]
    return [nested_ranking(records[i], params.ranking_length, params.seed) for i in order]
