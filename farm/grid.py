"""A study file read, its profile merged and its grid expanded into trials, each validated
whole (`farm.spec.Study`) before any Ray work starts. Every mistake becomes one `StudyError`
naming the file, the field and what is allowed."""

from __future__ import annotations

import copy
import itertools
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from farm.config import LABEL, StudyError, axis_labels, not_utf8, value_label
from farm.spec import Study

DEFAULT_PROFILE = "embedded"
# A study file is a few KB. One of megabytes is not the file meant, and YAML would take minutes on it.
MAX_STUDY_BYTES = 4 * 2**20


class Trial(BaseModel):
    """One grid point: the fully resolved study plus the axis values that made it."""

    model_config = ConfigDict(frozen=True)
    id: str
    axes: dict[str, Any]
    profile: str
    study: Study


def load_study(path: str | os.PathLike, profile: str = DEFAULT_PROFILE, max_trials: int = 1000) -> list[Trial]:
    """Read (with what it includes), merge the profile, expand the grid and validate every trial of a study file."""
    return expand(read_study(Path(path)), str(path), profile, max_trials)


def read_study(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A study file's document, with the files it names under `include:` (a path or a list of them,
    relative to the file, as lm-eval's task YAMLs include a template) merged beneath it: its own
    keys override theirs mapping by mapping, and `key: null` removes one of theirs; later includes
    override earlier ones."""
    try:
        if path.stat().st_size > MAX_STUDY_BYTES:
            raise StudyError(
                f"{path}: {path.stat().st_size / 2**20:.0f} MiB is not a study file (a study file is YAML of a few KB; "
                f"the farm reads none over {MAX_STUDY_BYTES // 2**20} MiB): is it the file you meant?"
            )
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except OSError as e:  # a folder, a file this user may not read
        raise StudyError(f"{path}: the study file cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise StudyError(f"{path}: {not_utf8(e)}") from None
    except RecursionError:  # PyYAML's parser recurses once per nesting level
        raise StudyError(f"{path}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise StudyError(f"{path}: a study file is a mapping of keys (name, model, data, stages, eval, grid, ...)")
    includes = doc.pop("include", None)
    if includes is None:
        return doc
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not includes or not all(isinstance(i, str) and i for i in includes):
        raise StudyError(f"{path}: include: a file name, or a list of them, relative to {path.parent}/")
    base: dict = {}
    for name in includes:
        included = (path.parent / name).resolve()
        if included == path.resolve() or included in seen:
            raise StudyError(f"{path}: include: {name} includes itself, through {' -> '.join(p.name for p in (*seen, path.resolve(), included))}")
        if not included.is_file():
            raise StudyError(f"{path}: include: {name}: no such file ({included})")
        base = deep_merge(base, read_study(included, (*seen, path.resolve())))
    return deep_merge(base, doc)


def expand(doc: dict, where: str, profile: str = DEFAULT_PROFILE, max_trials: int = 1000) -> list[Trial]:
    doc = copy.deepcopy(doc)
    profiles = doc.pop("profiles", None) or {}
    grid = doc.pop("grid", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(p, dict) for p in profiles.values()):
        raise StudyError(f"{where}: profiles: a mapping of profile name -> overrides")
    if profile != DEFAULT_PROFILE and profile not in profiles:
        raise StudyError(f"{where}: profile {profile!r} is not defined; allowed: {', '.join([DEFAULT_PROFILE, *profiles])}")
    doc = deep_merge(doc, profiles.get(profile, {}))
    # A profile may override the grid axis by axis, and drop an axis with `axis: null`.
    override = doc.pop("grid", None) or {}
    if not isinstance(override, dict):
        raise StudyError(f"{where}: profiles.{profile}.grid: a mapping of dotted field path -> list of values")
    axes = {**_check_grid(grid, where), **_check_grid({a: v for a, v in override.items() if v is not None}, where)}
    axes = {a: v for a, v in axes.items() if not (a in override and override[a] is None)}
    if "seed" in axes:  # seeds last in trial ids, whichever grid added an axis
        axes["seed"] = axes.pop("seed")
    points = list(itertools.product(*(list(v.items()) for v in axes.values())))
    if len(points) > max_trials:
        raise StudyError(f"{where}: grid: expands to {len(points)} trials, more than the maximum {max_trials} (raise --max-trials)")
    labels = axis_labels(list(axes))
    trials = []
    for values in points:
        point = {axis: value for axis, (_, value) in zip(axes, values)}
        trial_doc = copy.deepcopy(doc)
        # Shallow paths first: `data.transforms.0.rate` refines a whole `data.transforms.0`.
        for axis in sorted(point, key=lambda a: a.count(".")):
            _set_path(trial_doc, axis, point[axis], where)
        try:
            study = Study.model_validate(trial_doc)
        except ValidationError as e:
            shown = {a: (v if isinstance(v, (str, int, float, bool, type(None))) else label) for a, (label, v) in zip(axes, values)}
            raise StudyError(_format_errors(e, where, shown, trial_doc)) from None
        trial_id = "_".join(f"{labels[a]}={label}" for a, (label, _) in zip(axes, values)) or "base"
        # A trial's axis values as table cells: the label where the value is a whole sub-document.
        cells = {a: (v if isinstance(v, (str, int, float, bool)) else label) for a, (label, v) in zip(axes, values)}
        trials.append(Trial(id=trial_id, axes=cells, profile=profile, study=study))
    main_axis = trials[0].study.report.main_axis if trials else None
    if main_axis and main_axis not in axes:  # a profile that replaces the grid must name its own main axis
        raise StudyError(
            f"{where}: report.main_axis: {main_axis!r} is not a grid axis{f' of profile {profile}' if profile != DEFAULT_PROFILE else ''}; "
            f"axes: {', '.join(axes) or 'none'} (set report.main_axis to one of them)"
        )
    report = trials[0].study.report if trials else None
    unknown = [a for a in report.labels if a not in axes and a not in report.columns] if report else []
    if unknown:
        raise StudyError(
            f"{where}: report.labels: {unknown[0]!r} is neither a grid axis nor a derived column (report.columns); axes: {', '.join(axes) or 'none'}"
        )
    return trials


def deep_merge(base: dict, override: dict) -> dict:
    """Override mappings key by key; lists and values are replaced; `key: null` removes a key
    (a profile drops a stage with `stages: {pretrain: null}`)."""
    out = dict(base)
    for k, v in override.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_grid(grid: Any, where: str) -> dict[str, dict[str, Any]]:
    """Each axis as {label: value}. An axis is a list of values (labelled by `value_label`) or a
    mapping of label -> value, for values with no short name of their own (a stage, a data mix)."""
    if not isinstance(grid, dict):
        raise StudyError(f"{where}: grid: a mapping of dotted field path -> list of values, e.g. 'seed: [42, 43]'")
    axes = {}
    for axis, values in grid.items():
        if isinstance(values, dict):
            bad = [k for k in values if not re.fullmatch(LABEL, str(k))]
            if bad:
                raise StudyError(f"{where}: grid.{axis}: label {bad[0]!r}: use letters, digits, '.', '+' or '-' (it becomes part of trial ids)")
            labelled = {str(k): v for k, v in values.items()}
        elif isinstance(values, list):
            labelled = {value_label(v): v for v in values}
            if len(labelled) < len(values):
                raise StudyError(
                    f"{where}: grid.{axis}: two values share the label {_first_repeat([value_label(v) for v in values])!r}; give the axis as a mapping of label -> value"
                )
        else:
            raise StudyError(f"{where}: grid.{axis}: a list of values, e.g. [{values!r}], or a mapping of label -> value")
        if not labelled:
            raise StudyError(f"{where}: grid.{axis}: an empty {type(values).__name__} expands to zero trials; give at least one value")
        axes[axis] = labelled
    return axes


def _first_repeat(items: list) -> Any:
    return next(x for i, x in enumerate(items) if x in items[:i])


def _set_path(doc: dict, path: str, value: Any, where: str) -> None:
    keys = str(path).split(".")
    node = doc
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise StudyError(f"{where}: grid.{path}: {'.'.join(keys[:i]) or 'root'} has {len(node)} items; {key!r} is not an index of it")
            key = int(key)
        elif not isinstance(node, dict):
            raise StudyError(f"{where}: grid.{path}: {'.'.join(keys[:i])} is a value, not a mapping or list")
        if last and value is None and isinstance(node, dict):
            node.pop(key, None)  # as in a profile, null removes the key (a stage: `stages.dpo: {none: null, ...}`)
        elif last:
            node[key] = copy.deepcopy(value)
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def _doc_path(doc: Any, loc: tuple) -> list[str]:
    """The error location as the user wrote it: discriminated unions add their tag to pydantic's
    location ("stages.sft.sft.lr"), which is not a key of the document."""
    path, node = [], doc
    for part in loc:
        if isinstance(node, dict) and part not in node and part in (node.get("kind"), node.get("name"), path[-1] if path else None):
            continue
        path.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return path


def _format_errors(e: ValidationError, where: str, point: dict, doc: dict) -> str:
    lines = []
    for err in e.errors():
        loc = _doc_path(doc, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid":
            what = {"'kind'": "stage kind", "'name'": "transform"}.get(err["ctx"]["discriminator"], err["ctx"]["discriminator"])
            msg = f"unknown {what} {err['ctx']['tag']!r}; allowed: {err['ctx']['expected_tags']}"
        if err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{where}: {'.'.join(loc) or 'study'}: {msg}")
    if point:
        lines.append(f"  (in the trial with {', '.join(f'{k}={v!r}' for k, v in point.items())})")
    return "\n".join(lines)


def distinct(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out
