"""Constitutions for Study E (Constitutional AI, after Bai et al. 2022): principles pairing a
critique request with its revision request and a preference question, plus worked examples; and
the pure functions that draw principles and build the critique, revision and feedback prompts."""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from farm.config import not_utf8
from farm.data.sources import ASSISTANT, asset_path

PRINCIPLE_FIELDS = ("name", "critique", "revision", "preference")
EXAMPLE_FIELDS = ("prompt", "answer", "principle", "critique", "revision")
# The dialogue tags of Bai et al.'s SL-CAI prompts, written as HH turns.
CRITIQUE_REQUEST, CRITIQUE = "\n\nCritiqueRequest:", "\n\nCritique:"
REVISION_REQUEST, REVISION = "\n\nRevisionRequest:", "\n\nRevision:"
# The continuations the feedback model is scored on (the prompt ends with "The answer is:").
OPTIONS = (" (A)", " (B)")
# A tag at a line start (generation strips the text, so a leading tag has no newline).
_NEXT_TAG = re.compile(r"(?:^|\n)[ \t]*(?:CritiqueRequest|Critique|RevisionRequest|Revision):")


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # the critique request
    revision: str  # the matching revision request
    preference: str  # the multiple-choice question for AI feedback


@dataclass(frozen=True)
class Example:
    """A worked critique-revision, shown before each conversation (few-shot)."""

    prompt: str  # "\n\nHuman: ...\n\nAssistant:"
    answer: str
    principle: Principle
    critique: str
    revision: str


@dataclass(frozen=True)
class Round:
    """One finished critique-revision round of a conversation, as a growing transcript shows it."""

    principle: Principle
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    examples: tuple[Example, ...] = ()


# ---------------------------------------------------------------- loading


def bundled_constitutions() -> list[str]:
    folder = asset_path("constitution")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_constitution(name_or_path: str) -> Constitution:
    """A bundled constitution by name ("default") or a YAML file (a path, or a name ending in
    .yaml/.yml). Anything malformed is a ValueError naming the file and what is wrong."""
    path, label = _locate(name_or_path)
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"constitution {label}: {not_utf8(e)}") from None
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"constitution {label}: cannot be read: {e}") from None
    return _parse(doc, label)


def _locate(name_or_path: str):
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or "\\" in name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ValueError(f"constitution {name_or_path}: no such file")
        return path, name_or_path
    path = asset_path(f"constitution/{name_or_path}.yaml")
    if not path.is_file():
        raise ValueError(
            f"constitution {name_or_path!r}: no bundled constitution of that name "
            f"(bundled: {', '.join(bundled_constitutions())}); give a YAML file path for your own"
        )
    return path, f"{name_or_path!r} (bundled {name_or_path}.yaml)"


def _parse(doc, label: str) -> Constitution:
    where = f"constitution {label}"
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a mapping with 'principles' (and optionally 'examples'), got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"principles", "examples"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (allowed: principles, examples)")
    items = doc.get("principles")
    if not items or not isinstance(items, list):
        raise ValueError(f"{where}: 'principles' must be a non-empty list of {{{', '.join(PRINCIPLE_FIELDS)}}}")
    principles = tuple(Principle(**_fields(item, PRINCIPLE_FIELDS, f"{where}: principle {i}")) for i, item in enumerate(items, 1))
    names = [p.name for p in principles]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{where}: principle name {twice[0]!r} is used twice")
    examples = doc.get("examples") or []
    if not isinstance(examples, list):
        raise ValueError(f"{where}: 'examples' must be a list of {{{', '.join(EXAMPLE_FIELDS)}}}")
    by_name = dict(zip(names, principles))
    return Constitution(principles, tuple(_example(item, by_name, f"{where}: example {i}") for i, item in enumerate(examples, 1)))


def _fields(item, names: tuple[str, ...], where: str) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"{where} is not a mapping of {', '.join(names)}")
    unknown = sorted(set(item) - set(names))
    if unknown:
        raise ValueError(f"{where} has unknown field {unknown[0]!r} (fields: {', '.join(names)})")
    for name in names:
        value = item.get(name)
        if value is None:
            raise ValueError(f"{where} has no {name!r}")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {name!r} must be non-empty text")
    return {name: item[name] for name in names}


def _example(item, principles: dict, where: str) -> Example:
    f = _fields(item, EXAMPLE_FIELDS, where)
    if f["principle"] not in principles:
        raise ValueError(f"{where} names principle {f['principle']!r}, which the constitution lacks (its principles: {', '.join(principles)})")
    # Examples are concatenated before the conversation, so each must be a whole HH exchange.
    if not (f["prompt"].startswith("\n\nHuman:") and f["prompt"].endswith(ASSISTANT)):
        raise ValueError(f"{where}: 'prompt' must be an HH dialogue, \"\\n\\nHuman: ...\\n\\nAssistant:\"")
    return Example(**{**f, "principle": principles[f["principle"]]})


# ---------------------------------------------------------------- sampling and prompts


def draw_principles(record_id: str, seed: int, rounds: int, n: int) -> list[int]:
    """The principle index (of n) for each round of one record. Seeded by (seed, crc32(id)) so a
    row draws the same principles whatever other rows the data holds, and in any order."""
    import numpy as np

    if n < 1:
        raise ValueError("draw_principles: the constitution has no principles")
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, zlib.crc32(record_id.encode("utf-8"))])
    return rng.integers(n, size=rounds).tolist()


def _exchange(conversation: str, answer: str, principle: Principle, critique: str | None = None, revision: str | None = None, earlier=()) -> str:
    """conversation + answer + the earlier rounds whole + this round's critique request + cue,
    continued as far as the texts given go."""
    return f"{conversation} {answer}" + "".join(_round(r.principle, r.critique, r.revision) for r in earlier) + _round(principle, critique, revision)


def _round(principle: Principle, critique: str | None, revision: str | None) -> str:
    text = f"{CRITIQUE_REQUEST} {principle.critique}{CRITIQUE}"
    if critique is not None:
        text += f" {critique}{REVISION_REQUEST} {principle.revision}{REVISION}"
        if revision is not None:
            text += f" {revision}"
    return text


def _shots(examples) -> str:
    return "".join(_exchange(e.prompt, e.answer, e.principle, e.critique, e.revision) for e in examples)


def critique_prompt(conversation: str, answer: str, principle: Principle, examples=(), earlier=()) -> str:
    """The worked examples, then the conversation with its answer, the `earlier` rounds (their
    requests, critiques and revisions, in order: the growing transcript), a critique request, and
    the "Critique:" cue."""
    return _shots(examples) + _exchange(conversation, answer, principle, earlier=earlier)


def revision_prompt(conversation: str, answer: str, critique: str, principle: Principle, examples=(), earlier=()) -> str:
    """The critique prompt continued with the critique, the matching revision request, and the
    "Revision:" cue."""
    return _shots(examples) + _exchange(conversation, answer, principle, critique, earlier=earlier)


def fit_context(conversation: str, answer: str, earlier, principle: Principle, examples, fits):
    """(answer, earlier rounds, worked examples) of the largest context for one round whose
    revision prompt, with no critique yet, passes `fits` (the caller's token count, leaving room
    for the critique). Shortened only as whole parts, so the format stays intact: first the
    earlier rounds go (the conversation with the latest revision as its answer, Bai et al.'s own
    layout), then the worked examples, the farthest from the conversation first. With none left,
    generation keeps the end of the prompt and the conversation loses its start."""
    latest = earlier[-1].revision if earlier else answer
    layouts = [(answer, tuple(earlier))] + ([(latest, ())] if earlier else [])
    for n in range(len(examples), -1, -1):
        shown = tuple(examples[len(examples) - n :])
        for a, e in layouts:
            if fits(revision_prompt(conversation, a, "", principle, shown, e)):
                return a, e, shown
    return latest, (), ()


def end_of_turn(text: str) -> str:
    """A generated critique or revision, cut where the model starts the next tag of the format
    (generation itself stops only at Human/Assistant turns)."""
    return _NEXT_TAG.split(text, maxsplit=1)[0].strip()


def feedback_prompt(conversation: str, principle: Principle, answer_a: str, answer_b: str) -> str:
    """Bai et al.'s multiple-choice prompt; the conversation loses its trailing empty
    "Assistant:" cue, since the options are the candidate assistant turns."""
    conv = conversation.strip()
    if conv.endswith(ASSISTANT.strip()):
        conv = conv[: -len(ASSISTANT.strip())].rstrip()
    return (
        f"Consider the following conversation between a human and an assistant:\n{conv}\n"
        f"{principle.preference}\nOptions:\n(A) {answer_a}\n(B) {answer_b}\nThe answer is:"
    )


def soft_label(logp_a: float, logp_b: float, clamp: tuple[float, float] | None = None) -> float:
    """p_A = e^a / (e^a + e^b), as a logistic of the difference so that neither exponent
    overflows; then clamped to [low, high] if given."""
    if logp_a == logp_b:  # also both -inf, whose difference is nan
        p = 0.5
    else:
        d = logp_b - logp_a
        p = 1.0 / (1.0 + math.exp(d)) if d <= 0 else math.exp(-d) / (1.0 + math.exp(-d))
    if clamp is not None:
        p = min(max(p, clamp[0]), clamp[1])
    return p
