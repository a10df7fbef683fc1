"""The hub datasets of lm-eval's own tasks (Study B's `eval.benchmarks: {suite: hub}`), prepared in the
cache of `datasets` itself, as a machine has them after one online run of the harness.

lm-eval loads a task's data with `datasets.load_dataset(dataset_path, dataset_name)`. Offline, `datasets`
does not read the hub cache (HF_HUB_CACHE): it finds a prepared dataset in its own cache (HF_DATASETS_CACHE)
through `datasets.load.CachedDatasetModuleFactory` and `datasets/packaged_modules/cache/cache.py`, laid out
as `<namespace>___<name>/<config>/<version>/<hash>/{<name>-<split>.arrow, dataset_info.json}`, the config
folder being the dataset_name ("default" when there is none) and equal to dataset_info.json's config_name.

Each (dataset_path, dataset_name) the tasks read (`farm.preflight.task_datasets`, from lm-eval's configs)
is prepared here by `datasets`' own parquet builder, as the hub's parquet files are, with every split its
task config names (training_split, validation_split, test_split, fewshot_split), then moved from the
builder's folder (whose config id carries a suffix for the local data files) to the config's own; the hash
folder, the hub commit online, is a hash of the rows. Rows: the first ROWS of the bundled copies
(farm/assets/benchmarks, in the hub's schemas; `farm.eval.harness`), per MMLU subject for cais/mmlu.
Unlike the hub: toxigen's rows are the bundle's SafeNLP-based columns (text, toxicity_ai, toxicity_human,
...), truthful_qa's lack mc1_targets (truthfulqa_mc2 reads mc2_targets only).

`build(datasets_cache)` is a no-op when this file, the bundle and the libraries are unchanged since the
last build into `datasets_cache`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

TASKS = ("arc_challenge", "piqa", "hellaswag", "mmlu", "truthfulqa_mc2", "toxigen")  # Study B's benchmarks
ROWS = 8  # per split (per MMLU subject and split): small, and quick to prepare and to evaluate
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def build(datasets_cache: Path) -> None:
    """Prepare every hub dataset of TASKS in the `datasets` cache folder `datasets_cache`."""
    from importlib.metadata import version

    from farm.data.sources import asset_path
    from farm.eval.harness import BUNDLE, LOCAL_TASKS, MMLU_SPLITS

    datasets_cache = Path(datasets_cache)
    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(" ".join(version(p) for p in ("datasets", "pyarrow", "lm_eval")).encode())
    for rel in sorted({rel for _, splits, _ in LOCAL_TASKS.values() for rel in splits.values()} | set(MMLU_SPLITS.values())):
        key.update(asset_path(f"{BUNDLE}/{rel}").read_bytes())
    marker = datasets_cache / f".farm-lm-eval-{key.hexdigest()[:16]}"
    if marker.exists():
        return
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="farm-lm-eval-") as tmp:
            for (path, name), splits in configs().items():
                prepare(datasets_cache, path, name, splits, Path(tmp))
    finally:
        if bars:
            datasets.enable_progress_bars()
    marker.write_text("built\n")


def configs() -> dict[tuple[str, str | None], dict[str, list[dict]]]:
    """{(dataset_path, dataset_name): {split: rows}}: every hub dataset TASKS read, each with the splits its
    task config names, read from lm-eval's own YAMLs (MMLU: one per subject, under tasks/mmlu/default)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from farm.eval.harness import LOCAL_TASKS, MMLU_DIR, MMLU_SPLITS, builtin_tasks_dir, read_bundled
    from farm.preflight import task_datasets

    builtin = builtin_tasks_dir()
    mmlu: dict[str, dict[str, list[dict]]] = {}  # {subject: {split: rows}}
    for split, rel in MMLU_SPLITS.items():
        for row in read_bundled(rel):
            mmlu.setdefault(row["subject"], {}).setdefault(split, []).append(row)
    out: dict[tuple[str, str | None], dict[str, list[dict]]] = {}
    for task in TASKS:
        if task == "mmlu":
            yamls, bundled = sorted((builtin / MMLU_DIR).glob("mmlu_*.yaml")), {}  # the subjects; the groups (_mmlu*.yaml) read no data
        else:
            yamls = [builtin / LOCAL_TASKS[task][0]]
            bundled = {split: read_bundled(rel) for split, rel in LOCAL_TASKS[task][1].items()}
        for yaml_path in yamls:
            cfg = load_yaml(yaml_path, resolve_func=False, recursive=True)
            dataset = (cfg["dataset_path"], cfg.get("dataset_name"))
            rows = mmlu[dataset[1]] if task == "mmlu" else bundled
            # A split the bundle lacks (ARC, PIQA and HellaSwag's train, ToxiGen's train) gets the rows of the
            # bundle's validation split, or of its test split where it has only that (ToxiGen).
            fallback = rows.get("validation") or rows["test"]
            out[dataset] = {split: (rows.get(split) or fallback)[:ROWS] for split in dict.fromkeys(cfg[k] for k in SPLIT_KEYS if cfg.get(k))}
    wanted = set().union(*task_datasets(TASKS).values())
    assert set(out) == wanted, f"lm-eval's task configs read {sorted(wanted, key=str)}, the YAMLs read here {sorted(out, key=str)}"
    return out


def prepare(cache: Path, path: str, name: str | None, splits: dict[str, list[dict]], tmp: Path) -> Path:
    """Prepare one dataset config with `datasets`' parquet builder and move it into `cache` where
    `load_dataset(path, name)` finds it offline; returns its folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    config = name or "default"
    *owner, repo = path.split("/")
    dataset = camelcase_to_snakecase(repo)  # as datasets' hub loader names it (the arrow files' prefix)
    digest = hashlib.sha1(json.dumps([path, config, splits], sort_keys=True).encode()).hexdigest()  # stands for the hub commit
    work = tmp / f"{'___'.join([*owner, dataset])}--{config}"
    files = {}
    for split, rows in splits.items():
        files[split] = str(work / f"{split}.parquet")
        work.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    builder = Parquet(cache_dir=str(work / "prepared"), dataset_name=dataset, config_name=config, data_files=files, hash=digest)
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)  # <work>/prepared/<dataset>/<config>-<data files' hash>/<version>/<digest>
    assert json.loads((prepared / "dataset_info.json").read_text())["config_name"] == config
    folder = Path(cache) / "___".join([*owner, dataset]) / config
    shutil.rmtree(folder, ignore_errors=True)  # an earlier build's rows
    target = folder / prepared.parent.name / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(prepared), str(target))
    return target
