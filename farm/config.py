"""What every part of a study file's schema shares: the strict base model, the error a study
file gets, how a value names a local path or a hub model, and the labels of grid values.

The bottom of the farm's layers (docs/ARCHITECTURE.md): the schema of each part lives beside its
code (a source's in `farm.data.sources`, the model's in `farm.models`, a stage kind's in its
module), and each of them builds on this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from farm.files import content_digest

BUILT_MODELS = ("tiny-gpt2",)  # models built from a config instead of loaded


# Hub ids without an owner that the hub still serves; any other hub id is "owner/name".
LEGACY_HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


BUNDLED_TOKENIZERS = ("farm-bpe", "gpt2")


LABEL = r"[A-Za-z0-9][A-Za-z0-9.+-]*"  # a grid or condition label: it becomes part of trial ids and metric names


class StudyError(Exception):
    """A study file the farm cannot run. The message names file, field and the fix."""


def not_utf8(e: UnicodeDecodeError) -> str:
    """What to say of a file that is not UTF-8 text, from the decoder's error (which holds the bytes)."""
    data, at = bytes(e.object), e.start
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        guess = "it looks like UTF-16: it starts with a UTF-16 byte order mark"
    elif e.reason == "unexpected end of data":
        guess = "it ends inside a character: a truncated file"
    elif b"\x00" in data[:4096]:
        guess = "it holds NUL bytes: a binary file, or UTF-16/32 text"
    else:
        guess = "a binary file, or text in another encoding such as latin-1 or cp1252"
    return f"not UTF-8 text: byte 0x{data[at]:02x} at offset {at} is not UTF-8 ({guess}); save it as UTF-8"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields that may name a local file or folder. What it holds enters the keys of the stages and
    # evaluations that read it (farm.config.local_inputs), not its name: a field that takes a path
    # and is missing here would let an edited file reuse a stale artifact.
    paths: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # pydantic's own "extra inputs are not permitted" does not say what *is* allowed.
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(cls.model_fields)}")
        return data


def looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


# Files of a model or tokenizer folder that transformers reads as UTF-8 text (configs, tokenizer
# files, a chat template); .safetensors weights are a JSON header and the tensors it places.
TEXT_FILES = (".json", ".txt", ".jinja")


def local_model_problem(folder: Path) -> str | None:
    """What is wrong with the bytes of a local model or tokenizer folder, or None. Its files are
    read at load, inside Ray; a file of other bytes (not UTF-8, not JSON, a truncated weights file)
    would end a trial in a traceback, so it is named here, before Ray starts."""
    if not folder.is_dir():
        return None
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (*TEXT_FILES, ".safetensors"):
            st = f.stat()
            problem = _file_problem(str(f), st.st_size, st.st_mtime_ns)  # cached: every trial validates the same folder
            if problem:
                return f"{f}: {problem}"
    return None


@functools.lru_cache(maxsize=1024)
def _file_problem(path: str, size: int, mtime_ns: int) -> str | None:
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):  # 8 bytes of header length, the JSON header, the tensors' bytes
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= size - 8:
                return "not a safetensors file: its first 8 bytes give no header length that fits the file"
            data = f.read(n)
        else:
            data = f.read()
    try:
        text = data.decode("utf-8")
        doc = json.loads(text) if path.endswith((".json", ".safetensors")) else None
    except UnicodeDecodeError as e:
        return not_utf8(e)
    except json.JSONDecodeError as e:
        return f"not valid JSON: {e}"
    if path.endswith(".safetensors"):
        try:
            end = 8 + n + max((int(v["data_offsets"][1]) for k, v in doc.items() if k != "__metadata__"), default=0)
        except (AttributeError, TypeError, KeyError, IndexError, ValueError):
            return "not a safetensors file: its header does not place its tensors"
        if end != size:
            return f"not a whole safetensors file: it has {size} bytes, and its header places {end} (truncated?)"
    return None


def hub_models(fields: dict[str, str | None], stages=()) -> list[str]:
    """The hub ids among `fields`' values ({field: name}): the names that are no stage of the study
    (`stages`), no built model, no local path, and in a tokenizer field no bundled tokenizer ("gpt2"
    is a hub model as a base, the bundled files as a tokenizer)."""
    return list(
        dict.fromkeys(
            v
            for f, v in fields.items()
            if v
            and v not in stages
            and v not in BUILT_MODELS
            and not looks_like_path(v)
            and not (f.endswith("tokenizer") and v in BUNDLED_TOKENIZERS)
        )
    )


def axis_labels(axes: list[str]) -> dict[str, str]:
    # The last name in the path ("rate"), or the list it indexes ("transforms" for "data.transforms.0"),
    # or the stage whose data it sets ("sft" for "stages.sft.data.sources").
    last = [_axis_name(a) for a in axes]
    return {a: (name if last.count(name) == 1 else a.replace(".", "-")) for a, name in zip(axes, last)}


def _axis_name(axis: str) -> str:
    names = [p for p in axis.split(".") if not p.isdigit()]
    while len(names) > 1 and names[-1] in ("data", "sources"):
        names.pop()
    return names[-1]


def value_label(v: Any) -> str:
    """A short readable label of a grid value: {name: malign_prompts, mode: trigger} -> malign_prompts-trigger."""
    if isinstance(v, dict) and "name" in v:
        v = "-".join(str(x) for k, x in v.items() if k == "name" or isinstance(x, (str, int, float)))
    if isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):
        v = "+".join(value_label(x) for x in v)  # a list of sources: hh_rlhf+lima
    if v is None:
        return "none"
    if isinstance(v, (dict, list)):
        return hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(v))


def local_inputs(spec, where: str = "") -> dict[str, str]:
    """{field: value} of the fields of `spec` (a model of the study file) and of the models in it
    that name a local file or folder: the fields its class lists in `paths`, when the value looks
    like a path (./..., /..., ~...) or is an existing file (`mydata.jsonl`). A name the farm
    resolves otherwise (a stage, a hub id, a bundled constitution) is neither."""
    found = {}
    for name in type(spec).model_fields:  # (not pydantic's iteration: planning walks every trial's study a few times)
        value = getattr(spec, name)
        if isinstance(value, str):
            if name in spec.paths and (looks_like_path(value) or Path(value).expanduser().is_file()):
                found[f"{where}{name}"] = value
        elif isinstance(value, BaseModel):
            found.update(local_inputs(value, f"{where}{name}."))
        elif isinstance(value, (list, tuple, dict)):
            for i, item in value.items() if isinstance(value, dict) else enumerate(value):  # sources, stages
                if isinstance(item, BaseModel):
                    found.update(local_inputs(item, f"{where}{name}.{i}."))
    return found


def content(spec, where: str = "") -> dict[str, dict]:
    """{field: {"path": value, "sha256": digest}} of every local file or folder `spec` names
    (`local_inputs`); one that cannot be read is a StudyError naming the field."""
    out = {}
    for name, value in local_inputs(spec, where).items():
        try:
            out[name] = {"path": value, "sha256": content_digest(value)}
        except OSError as e:
            raise StudyError(f"{name}: {value!r} cannot be read: {e.strerror or e}") from None
    return out
