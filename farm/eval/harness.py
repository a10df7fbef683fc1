"""lm-eval benchmarks as a farm metric (`benchmarks`).

The metric runs `lm_eval.simple_evaluate` on the evaluated model and tokenizer, in memory,
and reports one value per task as `bench/<task>`: the metric named in
`BENCHMARK_METRICS` (MMLU: the group's aggregate `acc`).

Two suites (`eval.benchmarks.suite`):

- `hub`: the harness's own tasks (`TaskManager()`), which download their data from the hub.
  This is what a cluster with hub access runs.
- `bundled` (offline): the copies of the data shipped in `farm/assets/benchmarks`. For each
  task a local YAML is generated at run time into a temporary folder. It `include:`s the
  harness's built-in YAML for that task (by absolute path, so the prompts, targets, metrics and
  `process_docs`/`process_results` functions are exactly the harness's own) and overrides only
  where the data comes from: `dataset_path: json`, `dataset_name: null`, the data files, and the
  splits the bundled copy lacks. The task names are the built-in ones, so `bench/<task>` means
  the same thing on both suites. `farm/assets/PROVENANCE.md` says what each copy holds and how
  it differs from the hub data.

The bundle itself is made once from the project's shared data folder by `farm.eval.bundle`
(run `python -m farm.eval.bundle SHARED_DATA_DIR`); nothing reads that folder at run time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

from farm.data.sources import read_asset_lines
from farm.eval.metrics import ITEMS, register
from farm.models import GENERATION

log = logging.getLogger(__name__)

BENCHMARK_METRICS = {
    "arc_challenge": "acc_norm",
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "mmlu": "acc",
    "truthfulqa_mc2": "acc",
    "toxigen": "acc_norm",
}
BUNDLE = "benchmarks"  # folder under farm/assets
# Fixed seeds (lm-eval's own defaults, passed explicitly): the same model gives the same numbers.
SEEDS = dict(random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)

# lm-eval 0.4.13's toxigen target (`utils.doc_to_target`) is a numpy.int32, which its few-shot
# formatting rejects ("Answer is not a string! : 1"): the built-in task runs zero-shot only. The
# bundled task writes the answers of its few-shot examples with the same rule as a Jinja
# template (a Python int); the evaluated documents keep the built-in function.
TOXIGEN_FEWSHOT_TARGET = "{{ ((toxicity_ai + toxicity_human) > 5.5) | int }}"

# Bundled tasks: built-in YAML (relative to lm_eval/tasks), {split: bundled file}, and the
# fields of the built-in config that the bundled copy has to change besides the data source.
# Few-shot examples: ARC's train split is not bundled, so they come from its validation split
# (the ARC dev set, disjoint from the test questions); PIQA and HellaSwag have only their
# validation split, which is also the evaluated one, so with `training_split: null` they come
# from it and lm-eval leaves out the document being asked (it does so when the few-shot split
# equals the test split, here both None). ToxiGen has only the bundled test rows: few-shot
# examples come from them, with the document being asked left out the same way.
LOCAL_TASKS = {
    "arc_challenge": ("arc/arc_challenge.yaml", {"test": "arc/test.jsonl.gz", "validation": "arc/validation.jsonl.gz"}, {"training_split": None}),
    "piqa": ("piqa/piqa.yaml", {"validation": "piqa/validation.jsonl.gz"}, {"training_split": None}),
    "hellaswag": ("hellaswag/hellaswag.yaml", {"validation": "hellaswag/validation.jsonl.gz"}, {"training_split": None}),
    "truthfulqa_mc2": ("truthfulqa/truthfulqa_mc2.yaml", {"validation": "truthfulqa/validation.jsonl.gz"}, {}),
    "toxigen": (
        "toxigen/toxigen.yaml",
        {"test": "toxigen/test.jsonl.gz"},
        {"training_split": None, "fewshot_split": "test", "fewshot_config": {"doc_to_target": TOXIGEN_FEWSHOT_TARGET}},
    ),
}
# MMLU: one task per subject (test split evaluated, dev split for few-shot, as built in),
# grouped by the built-in group YAMLs (mmlu -> mmlu_stem/... -> tag mmlu_<category>_tasks).
MMLU_SPLITS = {"test": "mmlu/test.jsonl.gz", "dev": "mmlu/dev.jsonl.gz"}
MMLU_DIR = "mmlu/default"


def builtin_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def read_bundled(rel: str) -> list[dict]:
    """Rows of one bundled gzipped JSONL file (`rel` under farm/assets/benchmarks)."""
    return [json.loads(line) for line in read_asset_lines(f"{BUNDLE}/{rel}") if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _write_yaml(path: Path, cfg: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _local_task(root: Path, builtin: Path, data_files: dict[str, str], overrides: dict, name: str) -> None:
    _write_yaml(
        root / f"{name}.yaml",
        {
            "include": str(builtin),  # absolute: lm-eval resolves it, and the !functions in it, from there
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            # cache_dir: `datasets` writes its Arrow copy into this run's temporary folder.
            "dataset_kwargs": {"data_files": data_files, "cache_dir": str(root / "hf-cache")},
            **overrides,
        },
    )


def write_local_tasks(root: Path, tasks: list[str]) -> None:
    """Write the bundled data and the override YAMLs of `tasks` into `root`."""
    builtin = builtin_tasks_dir()
    for task in tasks:
        if task == "mmlu":
            _write_mmlu(root, builtin)
            continue
        yaml_rel, splits, overrides = LOCAL_TASKS[task]
        files = {split: _write_jsonl(root / "data" / task / f"{split}.jsonl", read_bundled(rel)) for split, rel in splits.items()}
        _local_task(root, builtin / yaml_rel, files, overrides, task)


def _write_mmlu(root: Path, builtin: Path) -> None:
    by_subject: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for split, rel in MMLU_SPLITS.items():
        rows: dict[str, list[dict]] = defaultdict(list)
        for row in read_bundled(rel):
            rows[row["subject"]].append(row)
        for subject, subject_rows in rows.items():
            by_subject[subject][split] = subject_rows
    for group_yaml in sorted((builtin / MMLU_DIR).glob("_mmlu*.yaml")):  # the groups, unchanged
        _write_yaml(root / "mmlu" / group_yaml.name, {"include": str(group_yaml)})
    for subject, splits in sorted(by_subject.items()):
        name = f"mmlu_{subject}"
        files = {split: _write_jsonl(root / "data" / "mmlu" / subject / f"{split}.jsonl", rows) for split, rows in splits.items()}
        _local_task(root / "mmlu", builtin / MMLU_DIR / f"{name}.yaml", files, {}, name)


def task_metric(task: str, results: dict) -> str:
    """The metric reported for `task`, given lm-eval's `results["results"]`."""
    return BENCHMARK_METRICS.get(task) or ("acc_norm" if "acc_norm,none" in results[task] else "acc")


def task_value(task: str, results: dict) -> float:
    """The reported number of `task` in lm-eval's `results["results"]`."""
    return float(results[task][f"{task_metric(task, results)},none"])


def task_items(task: str, out: dict) -> dict:
    """{"ids", "values"}: the reported metric of each document of `task` (a group's: of its tasks'
    documents, ids `<task>:<doc_id>`), from lm-eval's logged samples. Their mean is the task's value,
    a group's too where lm-eval weighs its tasks by size (MMLU)."""
    metric, groups = task_metric(task, out["results"]), out.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        return [leaf for sub in groups[name] for leaf in leaves(sub)] if groups.get(name) else [name]

    docs = [(name, s) for name in leaves(task) for s in out["samples"].get(name, [])]
    return {"ids": [f"{name}:{s['doc_id']}" for name, s in docs], "values": [float(s[metric]) for _, s in docs]}


@contextlib.contextmanager
def _keep_global_state(model):
    """simple_evaluate seeds python/numpy/torch globally and HFLM puts the model in eval mode:
    give the caller its random state and the model's mode back."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    training = model.training
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        model.train(training)


class _CountTruncations(logging.Filter):
    """lm-eval warns once per request whose context it cuts to fit the model (thousands on a
    small model's 256 positions): count them instead, and say it once."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "exceeds model's maximum length" in record.getMessage():
            self.count += 1
            return False
        return True


@contextlib.contextmanager
def _quiet():
    """No per-request truncation warnings, no `datasets` progress bars (restored afterwards).
    lm-eval's own progress bars stay: tqdm reads TQDM_DISABLE only when it is imported."""
    import datasets

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    counter = _CountTruncations()
    hf_logger.addFilter(counter)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield counter
    finally:
        hf_logger.removeFilter(counter)
        if bars:
            datasets.enable_progress_bars()


def _lm_class():
    """HFLM that can also score a continuation longer than the model's context.

    lm-eval left-truncates a context to fit, but refuses (an assertion) a continuation that
    alone is longer than the model's positions: a few PIQA solutions are (up to 309 tokens of
    the farm's 4k BPE, against the tiny model's 256). Such a continuation is scored in chunks of
    half the context, each conditioned on as much of what precedes it as fits (lm-eval's own
    left truncation), and the chunks' log-likelihoods summed, as lm-eval's rolling
    log-likelihood does for long texts. Every other request goes to HFLM unchanged."""
    from lm_eval.models.huggingface import HFLM

    class FarmHFLM(HFLM):
        long_continuations = 0

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            limit = self.max_length
            if all(len(cont) <= limit for _, _, cont in requests):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            step = max(1, limit // 2)
            flat, spans = [], []
            for key, ctx, cont in requests:
                start = len(flat)
                if len(cont) <= limit:
                    flat.append((key, ctx, cont))
                else:
                    self.long_continuations += 1
                    flat += [(None, ctx + cont[:i], cont[i : i + step]) for i in range(0, len(cont), step)]
                spans.append((start, len(flat)))
            res = super()._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm, override_bs=override_bs)
            return [(sum(r[0] for r in res[a:b]), all(r[1] for r in res[a:b])) for a, b in spans]

    return FarmHFLM


def check_hub_fewshot(bench) -> None:
    """Fail before any work where the built-in toxigen cannot build few-shot prompts."""
    if "toxigen" not in bench.tasks or not bench.num_fewshot:
        return
    from lm_eval.tasks.toxigen.utils import doc_to_target

    if not isinstance(doc_to_target({"toxicity_ai": 3.0, "toxicity_human": 3.0}), int):
        raise ValueError(
            "the harness's own toxigen task cannot run few-shot in this lm-eval "
            "(its target is a numpy integer, which its few-shot formatting rejects); set num_fewshot: 0, "
            "leave toxigen out of tasks, or use suite: bundled"
        )


def run_benchmarks(model, tok, bench) -> dict:
    """lm-eval's full output for the tasks of `bench` (a BenchmarkSpec), each document's values
    among its samples."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_keep_global_state(model))
        truncated = stack.enter_context(_quiet())
        include = [str(Path(bench.include).expanduser().resolve())] if bench.include else []  # the study's own tasks
        if bench.suite == "hub":
            manager = TaskManager(include_path=include) if include else TaskManager()
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="farm-bench-")))
            write_local_tasks(root, [t for t in bench.tasks if t in BENCHMARK_METRICS])
            # Only the generated YAMLs are indexed (the default index is ~14.7k tasks, ~10 s).
            manager = TaskManager(include_path=[str(root), *include], include_defaults=False)
        # A LoRA model unmerged (eval keeps it so for its reference): its base model with the
        # adapter layers injected and active, which is the PreTrainedModel HFLM takes.
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        lm = _lm_class()(pretrained=hf_model, tokenizer=tok, batch_size=bench.batch_size, device=device)
        out = simple_evaluate(
            model=lm,
            tasks=list(bench.tasks),
            num_fewshot=bench.num_fewshot,
            limit=bench.limit,
            task_manager=manager,
            log_samples=True,  # each document's metric: the report pairs trials document by document
            write_out=False,
            # lm-eval's sqlite cache of answered requests (written per request) in the eval's scratch
            # folder: a retried evaluation skips what was answered. None outside a farm evaluation.
            use_cache=str(GENERATION.scratch / "lm_eval") if GENERATION.scratch else None,
            cache_requests=False,
            check_integrity=False,
            evaluation_tracker=None,  # nothing written
            bootstrap_iters=0,  # no bootstrapped stderr (the values reported are means)
            **SEEDS,
        )
        if truncated.count:
            log.warning("lm-eval cut %d contexts from the left to fit the model's %d positions", truncated.count, lm.max_length)
        if lm.long_continuations:
            log.warning("%d continuations longer than the model's %d positions were scored in chunks", lm.long_continuations, lm.max_length)
        return out


@register("benchmarks", shape=None, higher_is_better={"bench/": True})  # accuracies (task_metric)
def benchmarks(model, ref, tok, records, spec) -> dict:
    """lm-eval tasks of `spec.benchmarks` on the evaluated model: {"bench/<task>": value}, and each
    document's value (ITEMS)."""
    out = run_benchmarks(model, tok, spec.benchmarks)
    tasks = spec.benchmarks.tasks
    return {**{f"bench/{t}": task_value(t, out["results"]) for t in tasks}, ITEMS: {f"bench/{t}": task_items(t, out) for t in tasks}}
