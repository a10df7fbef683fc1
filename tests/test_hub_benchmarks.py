"""Study B's `eval.benchmarks: {suite: hub}` offline: lm-eval's own hub tasks, run through the farm's
`benchmarks` metric, read their datasets from the `datasets` cache the hub mirror prepares
(tests/hub_mirror/lm_eval.py), as on a machine that ran the harness once online."""

import math
import time
from pathlib import Path

from farm.eval import harness
from farm.eval.harness import BENCHMARK_METRICS
from farm.eval.metrics import ITEMS
from farm.models import for_inference
from farm.spec import BenchmarkSpec, EvalSpec


def test_every_hub_task_runs_offline_from_the_datasets_cache(mirror, monkeypatch):
    import datasets.config
    import lm_eval.tasks

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import, like the cache folder (`mirror`)
    # The hub suite's TaskManager() indexes all ~14k built-in YAMLs (~13 s here); the same manager over the
    # built-in folders of these six tasks loads the same YAMLs, in a second.
    builtin = harness.builtin_tasks_dir()
    folders = sorted({str(builtin / Path(y).parent) for y, _, _ in harness.LOCAL_TASKS.values()} | {str(builtin / harness.MMLU_DIR)})

    class BuiltinFolders(lm_eval.tasks.TaskManager):
        def __init__(self):
            super().__init__(include_path=folders, include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", BuiltinFolders)
    model, tok = for_inference("gpt2")  # the mirror's tiny gpt2, by its hub id
    spec = EvalSpec(metrics=["benchmarks"], benchmarks=BenchmarkSpec(suite="hub", tasks=list(BENCHMARK_METRICS), limit=2))
    start = time.time()
    out = harness.benchmarks(model, model, tok, [], spec)  # as farm.eval.runner calls a metric
    print(f"six hub tasks, limit 2: {time.time() - start:.1f}s")
    per = out.pop(ITEMS)  # each document's value, as the report pairs them: two per task (MMLU: two per subject)
    assert set(out) == set(per) == {f"bench/{t}" for t in BENCHMARK_METRICS}
    assert all(len(v["values"]) == (2 * 57 if t == "bench/mmlu" else 2) for t, v in per.items())
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
