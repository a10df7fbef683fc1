"""Preflight: what a study's trials read from outside the farm, checked before Ray starts.

A model the hub lacks (a typo) or will not serve (a gated repository, no token) used to surface
inside Ray, after minutes of retried trials. Here every hub repository the trials name (models,
tokenizers, the scorers' classifiers, hub dataset sources, lm-eval's task datasets) is checked with
`farm.hub.check`, concurrently, and every failure is one line naming the repository, the study
field that needs it and the fix. Offline, lm-eval's task datasets are looked for in the cache of
`datasets` (HF_DATASETS_CACHE) instead: lm-eval reads them with `datasets.load_dataset`, which
offline reads only that cache, never the hub cache. A study whose eval set would be empty is
refused too (that needs no hub: it follows from the study file).

Before all that, `pin` resolves each hub model and dataset the study reads to a commit and writes it
into the study (its revision fields), so that the keys hold it and every load reads it.

Also here: the runtime env that carries this process's hub settings (the token among them) to the
workers of a running Ray cluster; the farm writes the token nowhere.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from farm import hub, registry
from farm.config import BUILT_MODELS, BUNDLED_TOKENIZERS, StudyError, hub_models, local_model_problem
from farm.config import looks_like_path as is_path
from farm.data.sources import SourceSpec, hub_files
from farm.eval.harness import builtin_tasks_dir
from farm.label.scorers import ROBERTA_HATE, hub_reachable
from farm.schema import TrainingStage
from farm.spec import included_tasks

# Every model the farm loads (causal LM, reward model, classifier) starts from its config.json; a
# repository without one (GGUF-only, a dataset id given as a model) is not the one the study means.
MODEL_FILES = ("config.json",)
# Detoxify's released checkpoints come from GitHub; each names the hub model whose config and
# tokenizer it loads (the checkpoint's config.arch.args.model_type).
DETOXIFY_BASES = {
    "original": "bert-base-uncased",
    "unbiased": "roberta-base",
    "multilingual": "xlm-roberta-base",
    "original-small": "albert-base-v2",
    "unbiased-small": "albert-base-v2",
}


@dataclass(frozen=True)
class Repo:
    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    patterns: tuple[str, ...] | None = None


# ---------------------------------------------------------------- what a study reads


def datas(study):
    """(field, DataSpec) of every data spec of the study."""
    yield "data", study.data
    for name, stage in study.stages.items():
        if stage.data:
            yield f"stages.{name}.data", stage.data
    if study.eval.data:
        yield "eval.data", study.eval.data


def models(study):
    """(field, hub id or local path) of every model and tokenizer the study loads by name."""
    if study.model.base not in BUILT_MODELS:
        yield "model.base", study.model.base
    tokenizer = study.model.tokenizer
    if tokenizer and tokenizer not in BUNDLED_TOKENIZERS and tokenizer != study.model.base:
        yield "model.tokenizer", tokenizer
    # refs() name stages of the study or models; a value that is no stage's name is a model.
    for name, stage in study.stages.items():
        yield from ((f"stages.{name}.{f}", v) for f, v in stage.refs().items() if v not in study.stages)
        counted = stage.diversity_tokenizer if isinstance(stage, TrainingStage) else None
        if counted and counted not in BUNDLED_TOKENIZERS:
            yield f"stages.{name}.diversity_tokenizer", counted
    yield from ((f"eval.{f}", v) for f, v in study.eval.refs().items() if v not in study.stages)
    yield from scorer_models(study)


def scorer_models(study):
    """(field, hub id or path) of the classifiers the study's scorers load (`auto` needs none: it
    falls back to the embedded classifier)."""
    labels = [(f"{where}.labels.{i}", lab.scorer, lab.model) for where, data in datas(study) for i, lab in enumerate(data.labels)]
    if "generation" in study.eval.metrics:
        labels.append(("eval.generation.scorer", study.eval.generation.scorer, None))
    if "misalignment" in study.eval.metrics:
        labels.append(("eval.conditional.toxicity", study.eval.conditional.toxicity.scorer, study.eval.conditional.toxicity.model))
    for field, scorer, model in labels:
        if scorer == "roberta_hate":
            yield f"{field} [roberta_hate]", model or ROBERTA_HATE
        elif scorer == "detoxify" and (model or "original") in DETOXIFY_BASES:
            yield f"{field} [detoxify {model or 'original'}'s base model]", DETOXIFY_BASES[model or "original"]


def hub_sources(study):
    """(field, SourceSpec) of every source read from the hub, a transform's own sources too
    (malign_prompts' red_team prompts)."""
    for where, data in datas(study):
        for i, s in enumerate(data.sources):
            if s.origin == "hub":
                yield f"{where}.sources.{i} [{s.name}]", s
        for j, t in enumerate(data.transforms):
            for key, value in t:
                if isinstance(value, SourceSpec) and value.origin == "hub":
                    yield f"{where}.transforms.{j}.{key} [{value.name}]", value


# ---------------------------------------------------------------- hub revisions, pinned


def pins(study):
    """(path of the field that holds its revision, repo id, repo type, the revision given or None) of
    each hub model and dataset the study loads by id: model.base and model.tokenizer, the models its
    stages and eval name (judges, reward models, generators, feedback models, a diversity tokenizer)
    and hub dataset sources (a transform's too). Not here: the scorers' classifiers (loaded by name
    inside the labelling pipeline and Detoxify) and lm-eval's task datasets (lm-eval reads them)."""
    m = study.model
    if hub_models({"base": m.base}):
        yield ("model", "revision"), m.base, "model", m.revision
    if m.tokenizer != m.base and hub_models({"tokenizer": m.tokenizer}):
        yield ("model", "tokenizer_revision"), m.tokenizer, "model", m.tokenizer_revision
    for name, stage in study.stages.items():
        for repo in stage.hub_models(study.stages):
            yield ("stages", name, "revisions", repo), repo, "model", stage.revisions.get(repo)
    for repo in hub_models(study.eval.refs(), study.stages):
        yield ("eval", "revisions", repo), repo, "model", study.eval.revisions.get(repo)
    datas = [(("data",), study.data), *((("stages", n, "data"), s.data) for n, s in study.stages.items() if s.data)]
    datas += [(("eval", "data"), study.eval.data)] if study.eval.data else []
    for where, data in datas:
        sources = [((*where, "sources", i), s) for i, s in enumerate(data.sources)]
        sources += [((*where, "transforms", j, k), v) for j, t in enumerate(data.transforms) for k, v in t if isinstance(v, SourceSpec)]
        for path, source in sources:
            if source.origin == "hub":
                repo, revision, _ = hub_files(source)
                yield (*path, "revision"), repo, "dataset", revision


def revisions(study) -> dict[str, str | None]:
    """{repository: revision} of the hub inputs of a study (after `pin`: their commits), as the hub
    names a repository in its URLs (datasets/owner/name for a dataset)."""
    return {("datasets/" if kind == "dataset" else "") + repo: rev for _, repo, kind, rev in pins(study)}


def pin(trials) -> tuple[list, dict[str, list[str]]]:
    """The trials with each hub input (`pins`) at a commit, written into its revision field before
    planning: stage and eval keys hash those fields, so a new commit on the hub makes new keys (a
    rerun never reuses what the old one made), and every load reads that commit (`revision=`).
    Online the hub names the commit of each revision (default: the default branch); offline
    (HF_HUB_OFFLINE=1) or when the hub cannot be reached, the hub cache does. Also returns the
    revisions that did not resolve ({the hub's error: the revision fields}), left as given: `check`
    reports them with the repositories that cannot be read."""
    studies = {id(t.study): t.study for t in trials}
    wanted = {(repo, kind, rev) for s in studies.values() for _, repo, kind, rev in pins(s)}
    if not wanted:
        return trials, {}
    cached = False
    if not hub.offline():
        from huggingface_hub import constants

        cached = not hub_reachable()  # one check, not one timeout per repository
        if cached:
            print(
                f"farm: warning: the hub at {constants.ENDPOINT} is not reachable: hub revisions are pinned to the hub cache's commits",
                file=sys.stderr,
            )

    def resolve(repo_kind_rev):
        try:
            return hub.commit(*repo_kind_rev, cached=cached)
        except hub.HubError as e:
            return e

    with ThreadPoolExecutor(max_workers=min(16, len(wanted))) as pool:
        commits = dict(zip(wanted, pool.map(resolve, wanted)))
    failed: dict[str, list[str]] = {}
    pinned = {}
    for key, study in studies.items():
        for path, repo, kind, rev in pins(study):
            found = commits[(repo, kind, rev)]
            if isinstance(found, hub.HubError):
                fields = failed.setdefault(str(found), [])
                fields += [f for f in [".".join(map(str, path))] if f not in fields]
            elif found != rev:
                study = replace(study, path, found)
        pinned[key] = study
    return [t.model_copy(update={"study": pinned[id(t.study)]}) for t in trials], failed


def replace(obj, path: tuple, value):
    """A copy of the pydantic object `obj` with the value at `path` (field names, list indices, dict
    keys) set to `value`: the objects along the path are copied, nothing changes in place (a default
    instance may be shared by every study)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, list):
        return [*obj[:head], replace(obj[head], rest, value), *obj[head + 1 :]]
    if isinstance(obj, dict):
        return {**obj, head: replace(obj.get(head), rest, value)}
    return obj.model_copy(update={head: replace(getattr(obj, head), rest, value)})


def needs(trials) -> tuple[dict[Repo, list[str]], list[str]]:
    """The hub repositories the trials read, each with the fields that name it, and the problems
    found without the hub (a local path that does not exist, an lm-eval task that does not exist)."""
    repos: dict[Repo, list[str]] = {}
    problems: list[str] = []

    def add(repo: Repo, field: str) -> None:
        fields = repos.setdefault(repo, [])
        if field not in fields:
            fields.append(field)

    tasks: set[str] = set()
    for study in {id(t.study): t.study for t in trials}.values():
        for field, name in models(study):
            if is_path(name):
                if not Path(name).expanduser().exists():
                    problems.append(f"{field}: path {name!r} does not exist")
                elif problem := local_model_problem(Path(name).expanduser()):  # a field the spec does not check (diversity_tokenizer)
                    problems.append(f"{field}: {problem}")
            else:
                patterns = None if field.endswith("tokenizer") else MODEL_FILES
                add(Repo(name, "model", None, patterns), field)
        for field, source in hub_sources(study):
            try:
                repo_id, revision, patterns = hub_files(source)
            except ValueError as e:  # a split or subset the hub copy lacks
                problems.append(f"{field}: {e}")
                continue
            add(Repo(repo_id, "dataset", revision, tuple(patterns) if patterns else None), field)
        bench = study.eval.benchmarks
        if "benchmarks" in study.eval.metrics and bench.suite == "hub":  # the study's own tasks (include) are no hub's
            tasks.update(set(bench.tasks) - (included_tasks(bench.include) if bench.include else set()))
    if tasks:
        from importlib.metadata import version

        found = task_datasets(tuple(sorted(tasks)))
        for task in sorted(tasks):
            if task not in found:
                problems.append(
                    f"eval.benchmarks.tasks: lm-eval {version('lm_eval')} has no task {task!r}: check the spelling (`lm-eval ls tasks` lists them)"
                )
            field = f"eval.benchmarks.tasks [{task}]"
            if datasets_offline():  # lm-eval reads through `datasets`, which offline reads only its own cache
                problems += datasets_cache_problems(found.get(task, set()), field)
                continue
            for path, _ in sorted(found.get(task, ())):  # a config is a folder or file set of the repository
                add(Repo(path, "dataset"), field)
    return repos, sorted(set(problems))


# ---------------------------------------------------------------- lm-eval's task datasets


@lru_cache(maxsize=8)
def task_datasets(tasks: tuple[str, ...]) -> dict[str, set[tuple[str, str | None]]]:
    """The hub datasets (dataset_path, dataset_name) each lm-eval task, group or tag reads, from the
    harness's own task configs, downloading nothing. lm-eval's TaskManager parses all ~14k task
    YAMLs (~15 s); here only those whose text names a wanted task, group or tag are parsed, with
    lm-eval's own loader and indexer, round by round down a group's members."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    from lm_eval.tasks._index import Kind, TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    texts = {p: p.read_text(errors="replace") for p in TaskIndex._iter_yaml_files(builtin_tasks_dir())}
    index: dict = {}
    parsed: set = set()
    searched: set[str] = set()
    quiet = logging.getLogger("lm_eval.tasks._index")
    level, quiet.level = quiet.level, logging.ERROR  # duplicate names are lm-eval's to warn about
    try:
        todo = set(tasks)
        while todo:
            searched |= todo
            word = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(todo))) + r")(?![\w-])")
            for path, text in texts.items():  # sorted, as TaskIndex.build goes, so duplicates resolve alike
                # A substring test first: the regex alone costs ~0.4 s a round over ~14k files.
                if path not in parsed and any(name in text for name in todo) and word.search(text):
                    parsed.add(path)
                    try:
                        TaskIndex.process_cfg(load_yaml(path, resolve_func=False, recursive=True), path, index)
                    except Exception:  # noqa: BLE001 - as TaskIndex.build: a YAML it cannot read holds no task
                        continue
            todo = {m for name in searched if name in index for m in members(index[name]) if isinstance(m, str)} - searched - index.keys()
    finally:
        quiet.level = level

    def leaves(name: str, seen: frozenset) -> set:
        entry = index[name]
        if entry.kind is Kind.TASK:
            return {(entry.cfg.get("dataset_path"), entry.cfg.get("dataset_name"))}
        out = set()
        for m in members(entry):
            if isinstance(m, tuple):  # an inline task config of a group
                out.add(m)
            elif m in index and m not in seen:
                out |= leaves(m, seen | {m})
        return out

    found = {t: leaves(t, frozenset({t})) for t in tasks if t in index}
    # Builders such as "json" read files the task names, not a hub repository.
    return {t: {(p, n) for p, n in d if p and p not in _PACKAGED_DATASETS_MODULES} for t, d in found.items()}


def members(entry) -> list:
    """A group's members (names, or (dataset_path, dataset_name) of an inline task config), a tag's tasks."""
    from lm_eval.tasks._index import Kind

    if entry.kind is Kind.TAG:
        return sorted(entry.tags)
    if entry.kind is not Kind.GROUP:
        return []
    out = []
    listed = entry.cfg.get("task") or []
    for m in listed if isinstance(listed, list) else [listed]:
        if isinstance(m, dict) and m.get("dataset_path"):
            out.append((m["dataset_path"], m.get("dataset_name")))
        elif isinstance(m, dict) and isinstance(m.get("task"), str):
            out.append(m["task"])
        elif isinstance(m, str):
            out.append(m)
    return out


# ---------------------------------------------------------------- lm-eval's task datasets, offline


def datasets_offline() -> bool:
    from datasets import config

    return bool(config.HF_HUB_OFFLINE)  # HF_DATASETS_OFFLINE, or else HF_HUB_OFFLINE


def in_datasets_cache(path: str, name: str | None) -> bool:
    """Whether `datasets.load_dataset(path, name)` finds the dataset prepared in its own cache, as it
    looks offline (datasets.load.CachedDatasetModuleFactory, datasets/packaged_modules/cache/cache.py):
    a folder `$HF_DATASETS_CACHE/<namespace>___<name>/<config>/<version>/<hash>` whose dataset_info.json
    names that config (any config when `name` is None)."""
    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    *owner, repo = path.split("/")
    root = Path(config.HF_DATASETS_CACHE).expanduser() / "___".join([*owner, camelcase_to_snakecase(repo)])
    for info in root.glob(f"{glob.escape(name) if name else '*'}/*/*/dataset_info.json"):
        try:
            if json.loads(info.read_text(encoding="utf-8")).get("config_name") == info.parents[2].name:
                return True
        except (OSError, ValueError):  # a half-written folder is not a prepared dataset
            continue
    return False


def datasets_cache_problems(datasets: set[tuple[str, str | None]], field: str) -> list[str]:
    """One line per dataset of an lm-eval task whose configs (dataset_name) are not in the datasets cache."""
    from datasets import config

    missing: dict[str, list[str | None]] = {}
    for path, name in sorted(datasets, key=str):
        if not in_datasets_cache(path, name):
            missing.setdefault(path, []).append(name)
    out = []
    for path, names in missing.items():
        shown = ", ".join(map(str, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f" (config{'s' if len(names) > 1 else ''} {shown})" if names[0] else ""
        load = f"datasets.load_dataset('{path}'{f', {names[0]!r}' if names[0] else ''})"
        out.append(
            f"dataset {path}{what} is not in the datasets cache ({config.HF_DATASETS_CACHE}) and `datasets` is offline: lm-eval reads "
            "its datasets through `datasets`, which offline reads only its own cache (HF_DATASETS_CACHE), not the hub cache; fill it "
            "where the hub is reachable, with the same HF_HOME (or HF_DATASETS_CACHE): run the study once there, or "
            f'`python -c "import datasets; {load}"`{" for each config" if len(names) > 1 else ""} (needed by {field})'
        )
    return out


# ---------------------------------------------------------------- the checks


def hub_problems(trials) -> list[str]:
    """One line per repository the trials cannot read (name, the fields that need it, the fix),
    and per missing local path or unknown lm-eval task."""
    repos, problems = needs(trials)
    if not repos:
        return problems
    if not hub.offline():
        from huggingface_hub import constants

        if not hub_reachable():  # fail once, not once per repository after each one's timeout
            return problems + [
                f"the hub at {constants.ENDPOINT} is not reachable from here, and the study reads {len(repos)} repositories from it "
                f"({', '.join(r.repo_id for r in repos)}): check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 over a "
                "hub cache filled elsewhere (HF_HOME)"
            ]

    def error(repo: Repo) -> str | None:
        try:
            hub.check(repo.repo_id, repo.repo_type, repo.revision, list(repo.patterns) if repo.patterns else None)
        except hub.HubError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=min(16, len(repos))) as pool:
        errors = dict(zip(repos, pool.map(error, repos)))
    # One line per failure: a repository missing as a whole fails alike for each file set read from it.
    lines: dict[str, list[str]] = {}
    for repo, e in errors.items():
        if e:
            fields = lines.setdefault(e, [])
            fields += [f for f in repos[repo] if f not in fields]
    return problems + [f"{e} (needed by {', '.join(fields)})" for e, fields in lines.items()]


def eval_problems(trials) -> list[str]:
    """Eval sets and training sets that are certainly empty, by the study file alone: the eval
    reads the study data's held-out rows (no eval.data), and a stage with `rows: heldout` trains on
    them; a holdout of 0 holds out no row."""
    out = []
    for t in trials:
        s = t.study
        need = [m for m in s.eval.metrics if registry.metrics.get(m).shape]
        if need and s.eval.data is None and s.data.holdout == 0:
            out.append(
                f"eval: the eval rows are the held-out rows of data (no eval.data is given) and data.holdout is 0.0, so the "
                f"eval set is empty, and eval.metrics {', '.join(need)} {'needs' if len(need) == 1 else 'need'} eval rows: set data.holdout above 0 (e.g. 0.05), "
                "or give eval.data (e.g. the source's test split)"
            )
        for name, stage in s.stages.items():
            data = stage.data or s.data
            if data.rows == "heldout" and data.holdout == 0:
                field = f"stages.{name}.data" if stage.data else "data"
                out.append(
                    f"{field}.rows: heldout trains stage {name} on the held-out rows, and {field}.holdout is 0.0: no row to "
                    f"train on; raise {field}.holdout or set rows: train"
                )
    return list(dict.fromkeys(out))


def check(trials, where: str, hub_checks: bool = True, unpinned: dict[str, list[str]] | None = None) -> None:
    """Raise StudyError listing every problem the preflight finds (hub ones unless `hub_checks`
    is off), one per line, and the hub revisions `pin` could not resolve (`unpinned`) but for those
    of a repository already named as unreadable; with `hub_checks` off those are only warned of."""
    empty = eval_problems(trials)
    unreadable = hub_problems(trials) if hub_checks else []
    unresolved = [f"{e} (at {', '.join(fields)})" for e, fields in (unpinned or {}).items() if not any(u.startswith(e) for u in unreadable)]
    if not hub_checks:
        for line in unresolved:
            print(f"farm: warning: not pinned to a commit: {line}", file=sys.stderr)
    problems = empty + unreadable + (unresolved if hub_checks else [])
    if problems:
        skip = "; --no-preflight skips the hub checks" if len(problems) > len(empty) else ""
        raise StudyError(
            f"{where} (profile {trials[0].profile}): preflight found {len(problems)} problem(s), before starting Ray{skip}:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


# ---------------------------------------------------------------- the workers' environment
