"""What starting a stage costs: one Ray Train `TorchTrainer.fit()` per stage, one fit for a
trial's unshared stages, and one Ray task for them (what the farm does on one worker).

Runs the tiny study's SFT -> DPO chain (its pretrain stage left out: SFT starts from the base
model) three times on a local Ray, each in a fresh store: one fit per stage (the baseline), the
chain as one grouped fit (what the farm did before issue 23, and still does for data-parallel or
DeepSpeed stages), and the chain as one Ray task (farm.worker's path for one worker). The
tiny stages train in a few seconds, so the wall is mostly the fixed cost. Prints each wall time,
the time outside the training loops, and the ratios baseline / each; writes
`bench/results/stage_overhead.json`. No target: it shows why the farm groups stages and why one
worker trains in a task.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train.torch  # noqa: F401  (the driver's import of Ray Train, outside the timings)
import yaml
from _results import write_result

from farm import worker as runner
from farm.grid import expand
from farm.plan import plan_trial
from farm.store import Store

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny.yaml"


def timed_chain(study, mode: str) -> tuple[float, float]:
    """(wall seconds of the SFT and DPO starts and training, seconds spent inside the training loops)."""
    stages = list(plan_trial(study).stages)
    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        for group in [[s] for s in stages] if mode == "fit per stage" else [stages]:
            if mode == "task":
                runner.run_group(study, "bench", group, storage, in_tune=False)  # one worker: the task path
            else:
                config = {"study": study, "trial": "bench", "stages": group, "storage": storage}
                runner.fit(study, config, in_tune=False)
        wall = time.perf_counter() - start
        store = Store(storage)
        inside = sum(store.marker(s.kind, s.key)["metrics"]["train_seconds"] for s in stages)
    return wall, inside


def main() -> int:
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    doc = yaml.safe_load(TINY.read_text())
    doc["stages"].pop("pretrain")
    study = expand(doc, str(TINY))[0].study
    ray.init(log_to_driver=False, include_dashboard=False)
    try:
        runs = {mode: timed_chain(study, mode) for mode in ("fit per stage", "grouped fit", "task")}
    finally:
        ray.shutdown()
    n = len(study.stages)
    base = runs["fit per stage"][0]
    result = {
        "stages": n,
        **{
            mode.replace(" ", "_"): {
                "wall_seconds": round(wall, 2),
                "outside_training_seconds": round(wall - inside, 2),
                "ratio": round(base / wall, 2),
            }
            for mode, (wall, inside) in runs.items()
        },
    }
    print(f"stage overhead: {n} stages timed (sft, dpo of the tiny study), load average {os.getloadavg()[0]:.2f}")
    for mode, (wall, inside) in runs.items():
        print(f"  {mode:<14} {wall:6.1f} s wall, {wall - inside:5.1f} s outside training, {base / wall:4.2f}x the baseline (fit per stage)")
    write_result("stage_overhead", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
